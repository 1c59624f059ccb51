"""Where the `segppo.kernels` and `segppo.cli` modules live (DESIGN.md §1).

The repository keeps them in the top-level `kernels/` and `cli/` folders, but those folders hold no
`__init__.py`: `python -m pytest` or `python -c` from the checkout puts its root first on `sys.path`,
and a root `kernels/__init__.py` would then be imported as Hugging Face's `kernels` package, which
transformers ≥ 5.25 imports whenever a model is built. So each package's `__init__.py` lives under
`segppo/`, and its `__path__` gains the top-level folder when running from a checkout (source or
editable install). A wheel has the modules beside the `__init__.py` (pyproject's `package-dir`
mapping plus the `__init__.py` as package data), and nothing is added.
"""

import os


def with_checkout_folder(path: list[str], folder: str, probe: str) -> list[str]:
    """A package's `__path__` plus the checkout's top-level `folder`, unless `probe` is already here."""
    here = path[0]
    if os.path.exists(os.path.join(here, probe)):
        return path
    checkout_folder = os.path.join(os.path.dirname(os.path.dirname(here)), folder)
    if not os.path.exists(os.path.join(checkout_folder, probe)):
        raise ImportError(f"segppo.{folder}: {probe} is neither in {here} nor in {checkout_folder}")
    return [*path, checkout_folder]
