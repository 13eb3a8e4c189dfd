"""Progress bars: tqdm's where it is installed, silent where it is not (a device install such as
``pip install 'dafar[onnx-runtime]'`` has no tqdm, and ``dafar bench --device-only`` runs there)."""
from __future__ import annotations

__all__ = ["progress"]


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``; without tqdm, the iterable itself, or (no iterable:
    a bar updated by hand) an object with tqdm's ``update``/``set_postfix_str``/``close``, silent."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable if iterable is not None else _SilentBar()
    return tqdm(iterable, **kwargs)


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass
