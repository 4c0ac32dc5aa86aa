"""What the Flower apps share: the message protocol, and the in-process grid of `fedsb demo`."""
