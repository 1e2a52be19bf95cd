"""What the console commands share (``cli``): the flags several entry points take and the
runner of a command.

May import: torch_io, configs.
"""
