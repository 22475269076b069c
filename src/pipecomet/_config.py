"""
Configuration: one TOML file, one frozen attrs class per table.

Each part of pipecomet owns a table (``[server]``, ``[quota]``, ``[workers]``,
``[bus]``, ``[comet]``, ``[limits]``...) and registers its class and its
installer in :data:`SECTIONS`; an app adds tables of its own with
:func:`register_section` (the demo's ``[demo]``).  Loading rejects unknown
tables and keys and bad values with a :class:`ConfigError` that names the
key, e.g. ``quota.categories.slow.reserve: must be >= 0``.

An app declares its defaults as tables (the demo's are ``demo.toml``);
:meth:`Config.with_defaults` lays a file over them key by key, so a file
names only what it changes (:func:`merge_tables`).
"""

from __future__ import annotations

import importlib
import tomllib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar, cast

import attrs

if TYPE_CHECKING:
    from ._app import App

_T = TypeVar("_T")
_Section = TypeVar("_Section", bound=attrs.AttrsInstance)

__all__ = ["ConfigError", "Config", "ServerConfig", "SECTIONS", "load_config", "read_tables",
           "merge_tables", "build_section", "register_section", "Installer"]


class ConfigError(ValueError):
    """
    A configuration value is missing, unknown or wrong; the message names it.
    """


@attrs.frozen
class ServerConfig:
    """
    ``[server]``: where and what to serve.

    :ivar port: Twisted endpoint string.
    :ivar app: ``module:attr`` of the app (an ``App`` or a factory); empty
        for the installed default app (the ``default`` entry point of the
        ``pipecomet.apps`` group: the demo gateway).
    :ivar idle_timeout: seconds a connection may stay silent (held comet
        requests are exempt).
    :ivar access_log: ``"on"`` (one line per request on standard output,
        buffered; see ``[logging]``), ``"off"``, or the path of a file to
        append the lines to.
    :ivar protocol: ``"pipecomet"`` (pipecomet's own HTTP/1.1 protocol,
        ``docs/http.md``) or ``"twisted"`` (twisted.web's ``HTTPChannel``
        and a plain ``Site``, for comparison: no lazy bodies, twisted.web's
        own limits and errors).
    :ivar drain_timeout: seconds a stopping server waits, after its parts
        have stopped, for the responses already written to leave before
        it drops the connections.
    :ivar processes: serving processes (``--processes``): a number, or
        ``"auto"`` for the cores this process may use.  Above 1 a
        supervisor keeps them running on one listening socket
        (docs/scaling.md); apps with comet routes need ``[bus] kind =
        "redis"``.
    :ivar processes_listen: ``"inherit"`` (one socket bound by the
        supervisor, adopted by every serving process; measured best) or
        ``"reuseport"`` (each binds its own with SO_REUSEPORT).
    :ivar drain_grace: at most this many seconds a stopping serving
        process (``--processes``) goes on serving the connections it
        accepted after it stopped listening, each closed after an answer
        with ``Connection: close``; it stops sooner when all have closed.
    """

    port: str = attrs.field(default="tcp:8080", validator=attrs.validators.instance_of(str))
    app: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    idle_timeout: float = attrs.field(default=60.0, converter=float,
                                      validator=attrs.validators.gt(0))
    access_log: str = attrs.field(default="on", validator=[attrs.validators.instance_of(str),
                                                          attrs.validators.min_len(1)])
    protocol: str = attrs.field(default="pipecomet",
                                validator=attrs.validators.in_(("pipecomet", "twisted")))
    drain_timeout: float = attrs.field(default=5.0, converter=float,
                                       validator=attrs.validators.ge(0))
    processes: int | str = attrs.field(default=1)
    processes_listen: str = attrs.field(default="inherit",
                                        validator=attrs.validators.in_(("inherit", "reuseport")))
    drain_grace: float = attrs.field(default=1.0, converter=float,
                                     validator=attrs.validators.ge(0))

    @processes.validator
    def _check_processes(self, attribute: attrs.Attribute[int | str], value: object) -> None:
        if value == "auto":
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"processes: must be a number >= 1 or \"auto\", not {value!r}")


#: What installs a part on an app from its table: ``install(app, config)``.
#: Any: each part's installer takes its own table's config class.
Installer = Callable[["App", Any], object]

#: table name → (its config class, or ``module:Class``; the installer that
#: builds the part on an app from that config, or ``module:function``, or
#: None).  Installers run in this order.
SECTIONS: dict[str, tuple[type | str, Installer | str | None]] = {
    "server": ("pipecomet._config:ServerConfig", None),
    "bus": ("pipecomet._bus:BusConfig", "pipecomet._bus:install"),
    "comet": ("pipecomet._comet:CometConfig", "pipecomet._comet:install"),
    "quota": ("pipecomet._quota:QuotaConfig", "pipecomet._quota:install"),
    "limits": ("pipecomet._lazy:LimitsConfig", "pipecomet._lazy:install"),
    "workers": ("pipecomet._workers:WorkersConfig", "pipecomet._workers:install"),
    "registration": ("pipecomet._backend._registration:RegistrationConfig",
                     "pipecomet._backend._registration:install"),
    "backends": ("pipecomet._backend:BackendsConfig", "pipecomet._backend:install"),
    "gc": ("pipecomet._gc:GCConfig", "pipecomet._gc:install"),
    "logging": ("pipecomet._observe:LoggingConfig", "pipecomet._observe:install_logging"),
    # Last: its collector and dashboard read the status of the parts above.
    "metrics": ("pipecomet._observe:MetricsConfig", "pipecomet._observe:install_metrics"),
}


def register_section(name: str, config_class: type, installer: Installer | None = None) -> None:
    """
    Add the table ``[name]`` to the configuration: a config file may have
    it, ``config.<name>`` gives its ``config_class`` (an attrs class, built
    as the other tables are: unknown keys and bad values fail naming the
    key), and ``installer(app, section)`` runs in :meth:`App.configure
    <pipecomet.App.configure>` after pipecomet's own parts.  Registering the
    same class again (a module imported twice) changes nothing.

    :raise ValueError: ``name`` is taken by another class.
    """
    if not attrs.has(config_class):
        raise ValueError(f"section {name!r}: {config_class!r} is not an attrs class")
    known = SECTIONS.get(name)
    if known is not None:
        if _resolve(known[0]) is config_class:
            return
        raise ValueError(f"section {name!r} is already registered")
    SECTIONS[name] = (config_class, installer)


def _resolve(spec: _T | str) -> _T:
    """
    ``spec``, or the object that its ``module:attribute`` names (trusted to
    be of the type the registry says).
    """
    if not isinstance(spec, str):
        return spec
    module, _, attr = spec.partition(":")
    return cast(_T, getattr(importlib.import_module(module), attr))


# Any: a type hint as typing.get_type_hints gives it (a class, a union, a
# generic alias...): typing has no type for type expressions.
def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_section(cls: type[_Section], table: object, where: str) -> _Section:
    """
    Build attrs class ``cls`` from a TOML table, recursing into attrs-typed
    fields and ``dict[str, AttrsClass]`` fields; errors name the key path.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    named = _named_tables(cls)
    if named is not None:
        # ``[backends.NAME]``: the table's own keys are the names.
        inner = _unwrap_optional(typing.get_args(hints[named.name])[1])
        table = {named.name: {k: build_section(inner, v, f"{where}.{k}") for k, v in table.items()}}
        try:
            return cls(**table)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where or cls.__name__}: {_field_message(e)}") from None
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs: dict[str, object] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        path = f"{where}.{key}" if where else key
        if name not in fields or name.startswith("_"):
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{path}: unknown key (known: {known})")
        tp = _unwrap_optional(hints.get(name, Any))
        origin = typing.get_origin(tp)
        if attrs.has(tp):
            value = build_section(tp, value, path)
        elif origin is dict and attrs.has(_unwrap_optional(typing.get_args(tp)[1])):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a table, got {type(value).__name__}")
            inner = _unwrap_optional(typing.get_args(tp)[1])
            value = {k: build_section(inner, v, f"{path}.{k}") for k, v in value.items()}
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {_field_message(e)}") from None


def _named_tables(cls: type) -> attrs.Attribute[Any] | None:
    """
    The field of ``cls`` marked ``metadata={"named_tables": True}`` (a
    ``dict[str, AttrsClass]`` whose names are the table's own keys, as in
    ``[backends.NAME]``), or None.
    """
    for f in attrs.fields(cls):
        if f.metadata.get("named_tables"):
            return f
    return None


def _field_message(e: Exception) -> str:
    # attrs validators put the attribute in args[1]; say its name.
    if len(e.args) >= 2 and isinstance(e.args[1], attrs.Attribute):
        return f"{e.args[1].name}: {e.args[0]}"
    return str(e)


def merge_tables(base: Mapping[str, object], over: Mapping[str, object]) -> dict[str, object]:
    """
    ``base`` with ``over`` laid on it: tables present in both are merged
    key by key (recursively), any other value in ``over`` replaces the one
    in ``base``.  Neither argument is changed.
    """
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            out[key] = merge_tables(below, value)
        else:
            out[key] = value
    return out


class Config:
    """
    The whole configuration.  ``config.quota`` etc. give each table's object
    (defaults when the file has none).

    :param sections: table name → its built object.
    :param data: the TOML tables the sections were built from, when they
        were (:meth:`from_dict`); :meth:`with_defaults` merges those.
    """

    def __init__(self, sections: Mapping[str, object] | None = None,
                 data: Mapping[str, object] | None = None) -> None:
        self._sections = dict(sections or {})
        self._given = frozenset(self._sections)
        self._data = dict(data) if data is not None else None

    # Any: a section's config class is the registry's (SECTIONS), not known
    # statically; ``config.quota`` is a QuotaConfig, ``config.demo`` the demo's.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._sections[name]
        except KeyError:
            pass
        if name not in SECTIONS:
            raise AttributeError(f"no config section {name!r}")
        value = _resolve(SECTIONS[name][0])()
        self._sections[name] = value
        return value

    def present(self) -> list[str]:
        """
        Tables given explicitly (not defaulted).
        """
        return list(self._sections)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Config:
        sections: dict[str, object] = {}
        for key, table in data.items():
            if key not in SECTIONS:
                known = ", ".join(sorted(SECTIONS))
                raise ConfigError(f"{key}: unknown section (known: {known})")
            sections[key] = build_section(_resolve(SECTIONS[key][0]), table, key)
        return cls(sections, data=data)

    @property
    def tables(self) -> dict[str, object]:
        """
        The TOML tables this configuration was read from (empty when it was
        built from objects).
        """
        return dict(self._data or {})

    def with_defaults(self, defaults: Mapping[str, object]) -> Config:
        """
        ``defaults`` (an app's tables) overlaid by this configuration: what
        it was read from overrides key by key, a section given as an object
        replaces its whole table.  Unknown keys fail, naming the key.
        """
        merged = merge_tables(defaults, self._data or {})
        built = Config.from_dict(merged)
        objects = {name: self._sections[name] for name in self._given
                   if self._data is None or name not in self._data}
        return Config({**built._sections, **objects}, data=merged)

    def installers(self) -> list[tuple[str, Installer]]:
        """
        ``(name, install)`` for every registered part with an installer.
        """
        return [(name, _resolve(inst)) for name, (_, inst) in SECTIONS.items() if inst]


def read_tables(path: str | Path) -> dict[str, object]:
    """
    The tables of a TOML file, unchecked; errors say which file.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(path: str | Path | None) -> Config:
    """
    Read a TOML file (or give defaults for None).
    """
    if path is None:
        return Config()
    return Config.from_dict(read_tables(path))


def _ivar_docs(cls: type) -> dict[str, str]:
    """
    ``:ivar name: text`` entries of a class docstring, folded to one line.
    """
    import inspect
    import re

    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    for m in re.finditer(r":ivar (\w+):(.*?)(?=\n\s*:\w|\Z)", doc, re.S):
        out[m.group(1)] = " ".join(m.group(2).split())
    return out


def reference_rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """
    ``(key, type, default, description)`` for every key of ``cls``, nested
    tables included (``quota.categories.<name>.limit``).
    """
    hints = typing.get_type_hints(cls)
    named = _named_tables(cls)
    if named is not None:
        return reference_rows(_unwrap_optional(typing.get_args(hints[named.name])[1]),
                              f"{prefix}.<name>")
    docs = _ivar_docs(cls)
    rows: list[tuple[str, str, str, str]] = []
    for f in attrs.fields(cls):
        if f.name.startswith("_"):
            continue
        tp = _unwrap_optional(hints.get(f.name, Any))
        key = f"{prefix}.{f.name}"
        if attrs.has(tp):
            rows.extend(reference_rows(tp, key))
            continue
        if typing.get_origin(tp) is dict and attrs.has(_unwrap_optional(typing.get_args(tp)[1])):
            rows.extend(reference_rows(_unwrap_optional(typing.get_args(tp)[1]), f"{key}.<name>"))
            continue
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]  # a class, typed as a function
            default = default.factory()
        # pipecomet._json.JSON is a string alias at run time: name it, not its expansion.
        type_name = ("JSON" if f.type == "JSON"
                     else getattr(tp, "__name__", str(tp).replace("typing.", "")))
        rows.append((key, type_name, repr(default), docs.get(f.name, "")))
    return rows


def reference_markdown() -> str:
    """
    The key reference of ``docs/configuration.md``, made from the classes.
    """
    parts = []
    for name, (cls_spec, _) in SECTIONS.items():
        cls = _resolve(cls_spec)
        parts.append(f"### `[{name}]`\n\n")
        summary = (cls.__doc__ or "").strip().split("\n\n")[0]
        summary = " ".join(summary.split())
        if summary:
            parts.append(summary + "\n\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|\n")
        for key, tp, default, text in reference_rows(cls, name):
            parts.append(f"| `{key}` | {tp} | `{default}` | {text} |\n")
        parts.append("\n")
    return "".join(parts)
