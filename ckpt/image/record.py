"""@record: frozen value classes for the image model, built without dataclasses.

`@dataclass(frozen=True)` compiles every class's methods with exec() and
imports `inspect`: ~35 ms of every restore's start-up on this machine
(bench.profile), for 17 classes that only hold data. A record is what the
model needs of a frozen dataclass and nothing more: fields in annotation
order with optional defaults, keyword or positional construction, no
assignment after construction, equality and hashing by value, a readable
repr, `fields()` and `replace()`.
"""
from __future__ import annotations

_MISSING = object()


class Default:
    """A field default made fresh for each instance (dataclasses' default_factory);
    compare=False leaves the field out of equality and hashing."""
    def __init__(self, factory, *, compare: bool = True):
        self.factory, self.compare = factory, compare


def record(cls):
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults, compared = {}, []
    for name in names:
        value = cls.__dict__.get(name, _MISSING)
        if isinstance(value, Default):
            defaults[name] = value
            if value.compare:
                compared.append(name)
            delattr(cls, name)
        else:
            compared.append(name)
            if value is not _MISSING:
                defaults[name] = value
    cls.__record_fields__ = names
    cls.__record_defaults__ = defaults
    cls.__record_compared__ = tuple(compared)
    cls.__init__, cls.__repr__ = _init, _repr
    cls.__setattr__, cls.__delattr__ = _frozen, _frozen
    cls.__eq__, cls.__hash__ = _eq, _hash
    return cls


def _init(self, *args, **kwargs):
    cls = type(self)
    names = cls.__record_fields__
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} arguments, got {len(args)}")
    d = self.__dict__
    for name, value in zip(names, args):
        d[name] = value
    for name in names[len(args):]:
        if name in kwargs:
            d[name] = kwargs.pop(name)
            continue
        default = cls.__record_defaults__.get(name, _MISSING)
        if default is _MISSING:
            raise TypeError(f"{cls.__name__}() missing argument {name!r}")
        d[name] = default.factory() if isinstance(default, Default) else default
    if kwargs:
        extra = next(iter(kwargs))
        raise TypeError(f"{cls.__name__}() got {'a second value for' if extra in d else 'an unexpected'}"
                        f" argument {extra!r}")


def _frozen(self, name, *value):
    raise AttributeError(f"{type(self).__name__} is frozen: cannot change {name!r}")


def _key(self) -> tuple:
    return tuple(self.__dict__[n] for n in type(self).__record_compared__)


def _eq(self, other):
    if type(other) is not type(self):
        return NotImplemented
    return _key(self) == _key(other)


def _hash(self):
    return hash(_key(self))


def _repr(self):
    return f"{type(self).__qualname__}(" + ", ".join(
        f"{n}={self.__dict__[n]!r}" for n in type(self).__record_fields__) + ")"


def fields(obj_or_cls) -> tuple[str, ...]:
    """Field names, in order."""
    return obj_or_cls.__record_fields__


def is_record(obj) -> bool:
    return hasattr(type(obj), "__record_fields__") and not isinstance(obj, type)


def replace(obj, **changes):
    """A copy of obj with some fields changed (dataclasses.replace)."""
    return type(obj)(**{n: changes.pop(n) if n in changes else obj.__dict__[n]
                        for n in obj.__record_fields__}, **changes)
