"""The `segppo` command. Its modules are in the repository's top-level cli/ folder; why this file is
not there: segppo/_layout.py."""

from segppo._layout import with_checkout_folder

__path__ = with_checkout_folder(__path__, "cli", "main.py")
