"""`python -m dflashtrain [overrides]`: the same as the `dflashtrain` command (handy under torchrun)."""

from dflashtrain.cli import train

if __name__ == "__main__":
    train()
