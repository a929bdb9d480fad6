"""Built-in byte-level language models, and building a model from a name or a factory path.

model = build_model("gru")                        # a built-in
model = build_model("my_project.models:tiny_lm")  # your own factory
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from importlib.machinery import PathFinder
from types import ModuleType
from typing import Any

from torch import nn

from shardwise.errors import ShardwiseError, first_line
from shardwise.models.generate import generate
from shardwise.models.recurrent import RecurrentLM
from shardwise.models.transformer import TransformerLM

__all__ = [
    "BUILTIN_MODELS",
    "RecurrentLM",
    "TransformerLM",
    "attends",
    "build_model",
    "check_model_spec",
    "generate",
]

_BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "lstm": partial(RecurrentLM, cell="lstm"),
    "gru": partial(RecurrentLM, cell="gru"),
    "transformer": TransformerLM,
}
BUILTIN_MODELS: tuple[str, ...] = tuple(_BUILTINS)
# The built-ins whose work on a sequence grows with the square of its length (attention).
_ATTENDING = frozenset({"transformer"})

_FORM = "'package.module:factory'"


def build_model(spec: str, vocab_size: int = 256) -> nn.Module:
    """Build the model `spec` names: a built-in, or a factory given as 'package.module:factory'.

        model = build_model("transformer", vocab_size=260)
        model = build_model("my_project.models:tiny_lm")

    A factory is called with `vocab_size=vocab_size` when its signature names a `vocab_size`
    parameter, and with no arguments otherwise; it must return an `nn.Module`. Anything a
    user can get wrong (unknown name, import failure, missing or uncallable attribute, the
    factory raising, a non-module result) raises `ShardwiseError` naming the spec.
    """
    if spec in _BUILTINS:
        return _BUILTINS[spec](vocab_size=vocab_size)
    factory = _resolve_factory(spec)
    takes_vocab = _takes_vocab_size(factory)
    try:
        model = factory(vocab_size=vocab_size) if takes_vocab else factory()
    except Exception as error:
        cause = first_line(error, with_type=True, whole=True)
        # Where in the factory it failed, from its own frame down (build_model's is ours).
        assert error.__traceback__ is not None  # just caught
        where = traceback.format_exception(type(error), error, error.__traceback__.tb_next)
        raise ShardwiseError(
            f"model {spec!r}: the factory raised {cause}; fix the factory",
            shown_traceback="".join(where),
        ) from error
    if not isinstance(model, nn.Module):
        raise ShardwiseError(
            f"model {spec!r}: the factory returned {type(model).__name__}, not a "
            "torch.nn.Module; make it return the model"
        )
    return model


def attends(spec: str) -> bool:
    """Whether the model `spec` names attends over whole sequences, its work quadratic in length.

    >>> attends("transformer"), attends("gru"), attends("my_project.models:tiny_lm")
    (True, False, False)

    Known for the built-ins only: a factory of yours counts as linear (the batch cost model,
    data/cost.py, takes a cost model of your own where that is wrong).
    """
    return spec in _ATTENDING


def check_model_spec(spec: str) -> None:
    """Check that `spec` names a built-in or an importable, callable factory, without building.

        check_model_spec("lstm")                       # fine
        check_model_spec("my_project.models:tiny_lm")  # imports my_project.models

    Raises `ShardwiseError` for the same mistakes as `build_model`, short of calling the
    factory; a factory whose signature needs arguments other than `vocab_size` fails here too.
    """
    if spec not in _BUILTINS:
        _resolve_factory(spec)


def _resolve_factory(spec: str) -> Callable[..., Any]:
    module_name, attribute = _split_spec(spec)
    try:
        module = import_user_module(module_name)
    except Exception as error:
        # A module that fails while importing is as much a user mistake as a missing one.
        cause = first_line(error, with_type=True, whole=True)
        raise ShardwiseError(
            f"model {spec!r}: cannot import {module_name!r} ({cause}); install it, "
            "run from its folder, or put its folder on PYTHONPATH"
        ) from error
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ShardwiseError(
                f"model {spec!r}: {module_name!r} has no attribute {attribute!r}"
                f"{_did_you_mean(part, dir(factory))}; name a function or class in it"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ShardwiseError(
            f"model {spec!r}: {attribute!r} is of type {type(factory).__name__}, not callable; "
            "name a function or class that returns an nn.Module"
        )
    _check_callable_without_arguments(spec, factory)
    return factory


def import_user_module(module_name: str) -> ModuleType:
    """Import the module of a user's factory: installed first, else from the working directory.

        module = import_user_module("my_models")   # ./my_models.py when nothing installed has it

    The working directory is never put on sys.path for good (a rich.py there would replace the
    library): only the factory's own top-level module is looked up there, and only when no
    installed package has that name. While it runs, the working directory sits at the end of
    sys.path so that its own `import sibling` lines work. Spawned workers start in the same
    directory and resolve the name the same way.
    """
    top = module_name.partition(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != top:  # the package exists; a submodule or a dependency is missing
            raise
        not_installed = error
    cwd = os.getcwd()
    importlib.invalidate_caches()  # the file may be newer than the finder's directory listing
    spec = PathFinder.find_spec(top, [cwd])
    if spec is None:
        raise not_installed
    module = importlib.util.module_from_spec(spec)
    sys.modules[top] = module
    try:
        with _searched_last(cwd):
            if spec.loader is not None:
                spec.loader.exec_module(module)
            return importlib.import_module(module_name)
    except BaseException:
        sys.modules.pop(top, None)
        raise


@contextlib.contextmanager
def _searched_last(folder: str) -> Iterator[None]:
    sys.path.append(folder)
    try:
        yield
    finally:
        # Remove the entry added above (the last one), not an equal one the user put earlier;
        # the module may have edited sys.path itself.
        with contextlib.suppress(ValueError):
            del sys.path[len(sys.path) - 1 - sys.path[::-1].index(folder)]


def _split_spec(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise ShardwiseError(
            f"model {spec!r} is not a built-in ({', '.join(BUILTIN_MODELS)})"
            f"{_did_you_mean(spec, BUILTIN_MODELS)}; use one of those or {_FORM}"
        )
    module_name, _, attribute = spec.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    parts_ok = all(p.isidentifier() for p in (*module_name.split("."), *attribute.split(".")))
    if not parts_ok:
        raise ShardwiseError(f"model {spec!r} is not of the form {_FORM}; e.g. 'my_pkg.lm:build'")
    return module_name, attribute


def _takes_vocab_size(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        return False
    parameter = parameters.get("vocab_size")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _check_callable_without_arguments(spec: str, factory: Callable[..., Any]) -> None:
    # Catch a factory that needs arguments before workers launch, not inside each of them.
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    takes_vocab = _takes_vocab_size(factory)
    try:
        signature.bind(**({"vocab_size": 256} if takes_vocab else {}))
    except TypeError as error:
        call = "factory(vocab_size=...)" if takes_vocab else "factory()"
        raise ShardwiseError(
            f"model {spec!r}: the factory cannot be called as {call} ({error}); "
            "give its other parameters defaults"
        ) from error


def _did_you_mean(name: str, options: Any) -> str:
    by_lower = {str(option).lower(): str(option) for option in options}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
