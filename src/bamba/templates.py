"""Chat templates: Jinja in transformers' sandbox, with bounds on the work and memory a template may take.

A checkpoint's chat template is code from whoever wrote the checkpoint. Jinja's sandbox (what transformers
uses) stops it from reaching Python's internals, but not from looping for hours or building a string of
terabytes. Here a rendering also has a budget:

- loop iterations and macro calls: at most MAX_STEPS + STEPS_PER_ITEM per message, tool or document (a
  tick is compiled into every loop body, loop filter and macro);
- characters: every value an operator (+ * % ~ **), a filter or a method call makes, and the output, at
  most MAX_CHARS + CHARS_PER_INPUT_CHAR per character of the input (the chat as JSON) each; their sum
  (the work done) at most WORK_PER_CHAR times that; numbers given to filters and methods (widths, counts)
  at most that too; an integer ** or * at most MAX_INT_BITS bits. (A template's output is tokenized next,
  where one long word costs some 200 bytes a character: the bounds keep that within reach.)

A template past a bound, or one that raises (a syntax error, raise_exception, an undefined call, Python's
recursion limit), gives an error naming the template's source that is both a ValueError and jinja2's
TemplateError (which transformers raises).
"""

from __future__ import annotations

import functools
import json
import operator
import re
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

MAX_STEPS = 100_000  # loop iterations + macro calls in one rendering, and per item of its lists:
STEPS_PER_ITEM = 1_000  # (messages, tools, documents)
MAX_CHARS = 1 << 20  # characters (or items) in one value, and in the output; plus CHARS_PER_INPUT_CHAR
CHARS_PER_INPUT_CHAR = 4  # for every character of the messages, tools and documents rendered
WORK_PER_CHAR = 16  # characters made by operators, filters and calls, in all, per character allowed
MAX_INT_BITS = 1 << 16  # bits of an integer that * or ** makes
# The template's own text: Jinja lexes and parses in Python at some microseconds a token, and 200,000
# tokens took 20-80 s here. The largest of llama.cpp's 71 real templates has 16,714 characters and
# 2,461 tokens (Kimi-K3): these bounds are 15 and 13 times that.
MAX_TEMPLATE_CHARS = 1 << 18
MAX_TEMPLATE_TOKENS = 1 << 15


class TemplateLimitError(Exception):
    """A chat template went past one of this module's bounds."""


class TemplateRefusal(Exception):
    """raise_exception(message) in a template: its message is for the user, and is passed on as it is."""


class _Budget(threading.local):
    """What the rendering on this thread has left (a template runs on the thread that renders it)."""

    steps: int | None = None
    work: int = 0
    chars: int = MAX_CHARS  # the bound of a value and of the output


_budget = _Budget()


def _step() -> str:
    """Compiled into every loop body and macro: one step of the rendering's budget."""
    if _budget.steps is not None:
        _budget.steps -= 1
        if _budget.steps < 0:
            raise TemplateLimitError("more loop iterations and macro calls than its budget")
    return ""


def _step_true() -> bool:
    """The tick of a loop's `if` filter (which tests items without running the body)."""
    _step()
    return True


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | dict | range) else 0


def _account(value: Any) -> Any:
    """Count a value made by the template against its budget."""
    n = _size(value)
    if n > _budget.chars:
        raise TemplateLimitError(f"a value of {n} characters or items (at most {_budget.chars})")
    _budget.work += n
    if _budget.work > WORK_PER_CHAR * _budget.chars:
        raise TemplateLimitError(f"more than {WORK_PER_CHAR * _budget.chars} characters made in all")
    return value


def _check_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Numbers given to a filter or a method (widths, counts, indents) within _budget.chars; format strings
    with no width or precision above it."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, int | float) and not isinstance(v, bool) and abs(v) > _budget.chars:
            raise TemplateLimitError(f"the number {v} given to a filter or method (at most {_budget.chars})")


_NUMBER = re.compile(r"\d+")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and any(int(n) > _budget.chars for n in _NUMBER.findall(fmt) if len(n) < 30):
        raise TemplateLimitError(f"a width or precision above {_budget.chars} in a format string")
    if isinstance(fmt, str) and any(len(n) >= 30 for n in _NUMBER.findall(fmt)):
        raise TemplateLimitError("a number of 30 digits or more in a format string")


def _concat(*values: Any) -> str:
    """Jinja's `~` (and `{{ a ~ b }}`), its size checked before the string is made."""
    parts = [v if isinstance(v, str) else str(v) for v in values]
    if sum(map(len, parts)) > _budget.chars:
        raise TemplateLimitError(f"a string of more than {_budget.chars} characters made with ~")
    return "".join(parts)  # (counted by the sandbox's call, as every call's result)


def _binop(op: str, left: Any, right: Any) -> Any:
    """+ * % ** with the size of the result checked before it is computed."""
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if (
                isinstance(seq, str | list | tuple)
                and isinstance(n, int)
                and _size(seq) * max(n, 0) > _budget.chars
            ):
                raise TemplateLimitError(f"a repetition of {_size(seq)} x {n} (at most {_budget.chars})")
        if (
            isinstance(left, int)
            and isinstance(right, int)
            and left.bit_length() + right.bit_length() > MAX_INT_BITS
        ):
            raise TemplateLimitError(f"a product of more than {MAX_INT_BITS} bits")
    elif op == "+" and _size(left) + _size(right) > _budget.chars:
        raise TemplateLimitError(
            f"a concatenation of {_size(left)} + {_size(right)} (at most {_budget.chars})"
        )
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if right > 0 and left.bit_length() * right > MAX_INT_BITS:
            raise TemplateLimitError(f"a power of more than {MAX_INT_BITS} bits")
    elif op == "%" and isinstance(left, str):
        _check_format(left)
        _check_arguments(right if isinstance(right, tuple) else (right,), {})
    return _account(_BINOPS[op](left, right))


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "*": operator.mul,
    "%": operator.mod,
    "**": operator.pow,
}


def _limited(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A filter whose numeric arguments (after the value it filters) and result are bounded."""
    skip = 2 if hasattr(fn, "jinja_pass_arg") else 1  # (the environment or context, then the value)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args[skip:], kwargs)
        value = args[skip - 1] if len(args) >= skip else None
        if name == "join" and isinstance(value, list | tuple | str):
            sep = args[skip] if len(args) > skip and isinstance(args[skip], str) else ""
            if sum(_size(v) for v in value) + len(sep) * len(value) > _budget.chars:
                raise TemplateLimitError(f"a join of more than {_budget.chars} characters")
        if name == "replace" and len(args) > skip + 1:
            old, new = str(args[skip]), str(args[skip + 1])
            if _size(value) * max(1, len(new)) > _budget.chars and old in str(value):
                raise TemplateLimitError(
                    f"a replacement that could make more than {_budget.chars} characters"
                )
        if name == "format":
            _check_format(value)
        return _account(fn(*args, **kwargs))

    return call


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """Compile a chat template in the sandbox, with the globals and filters transformers gives templates
    (raises jinja2's TemplateSyntaxError, or TemplateLimitError past MAX_TEMPLATE_CHARS or
    MAX_TEMPLATE_TOKENS; `render` names the template)."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateLimitError(f"a template of {len(source)} characters (at most {MAX_TEMPLATE_CHARS})")
    return _environment().from_string(source)


def _count_tokens(tokens: Any) -> Any:
    for n, token in enumerate(tokens):
        if n >= MAX_TEMPLATE_TOKENS:
            raise TemplateLimitError(f"a template of more than {MAX_TEMPLATE_TOKENS} tokens")
        yield token


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRefusal(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
    ):
        # Jinja's own tojson escapes HTML characters, which chat templates do not want.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class GenerationBlock(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: the body as written. (transformers uses the block to
        mark the assistant's tokens for return_assistant_tokens_mask, which is not supported here.)"""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(_BINOPS)

        def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
            return _binop(op, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _check_arguments(args, kwargs)
            wrapped = getattr(__obj, "__wrapped__", None)  # str.format, as the sandbox wraps it
            if getattr(wrapped, "__name__", "") in ("format", "format_map"):
                _check_format(getattr(wrapped, "__self__", None))
            return _account(super().call(__context, __obj, *args, **kwargs))

        def _tokenize(self, source: str, *args: Any, **kwargs: Any) -> Any:
            stream = super()._tokenize(source, *args, **kwargs)
            stream._iter = _count_tokens(stream._iter)  # (the parser's tokens, whitespace left out)
            return stream

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            tree = super()._parse(source, name, filename)
            tick = nodes.Output([nodes.Call(nodes.ImportedName(f"{__name__}._step"), [], [], None, None)])
            for node in tree.find_all((nodes.For, nodes.Macro, nodes.CallBlock)):
                node.body.insert(0, tick)
                if isinstance(node, nodes.For) and node.test is not None:  # {% for x in y if test %}
                    tick_true = nodes.Call(nodes.ImportedName(f"{__name__}._step_true"), [], [], None, None)
                    node.test = nodes.And(tick_true, node.test)
            for node in list(tree.find_all(nodes.Concat)):
                args = node.nodes
                node.__class__ = nodes.Call  # `a ~ b` -> _concat(a, b), its size checked first
                node.node, node.args, node.kwargs, node.dyn_args, node.dyn_kwargs = (
                    nodes.ImportedName(f"{__name__}._concat"),
                    args,
                    [],
                    None,
                    None,
                )
                del node.nodes
            return tree

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationBlock])
    env.filters["tojson"] = tojson
    env.filters = {name: _limited(f, name) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # (paragraphs of lorem ipsum by the million: not for chat templates)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=1)
def _error_class() -> type:
    import jinja2

    class ChatTemplateError(ValueError, jinja2.TemplateError):
        """A chat template that failed or went past a bound: a ValueError, and jinja2's TemplateError
        (what transformers raises)."""

    return ChatTemplateError


def _error(message: str) -> Exception:
    return _error_class()(message)


def render(source: str, where: str, **variables: Any) -> str:
    """The template's text rendered with `variables`, within this module's bounds; any failure is a
    ValueError that names `where` (the template's source: a file, or a tokenizer folder)."""
    if _budget.steps is not None:
        raise RuntimeError("chat templates render one at a time per thread")
    try:
        compiled = compile_template(source)
        inputs = [v for v in variables.values() if isinstance(v, list | tuple)]  # messages, tools, documents
        _budget.steps = MAX_STEPS + STEPS_PER_ITEM * sum(map(len, inputs))
        _budget.chars = MAX_CHARS + CHARS_PER_INPUT_CHAR * len(json.dumps(inputs, default=str))
        _budget.work = 0
        pieces, n = [], 0
        for piece in compiled.generate(**variables):
            n += len(piece)
            if n > _budget.chars:
                raise TemplateLimitError(f"an output of more than {_budget.chars} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateRefusal as e:  # (chat templates refuse conversations they cannot render: no tools...)
        raise _error(str(e)) from None
    except TemplateLimitError as e:
        raise _error(f"the chat template of {where} went past a bound: {e}") from None
    except RecursionError:
        raise _error(f"the chat template of {where} recursed too deeply") from None
    except Exception as e:  # the template is code from the checkpoint: whatever it raises is its failure
        raise _error(f"the chat template of {where} failed: {type(e).__name__}: {e}") from None
    finally:
        _budget.steps, _budget.chars = None, MAX_CHARS
