"""What fed-de's commands share: site arguments, choices, errors, messages and the facts table.

- Errors go to stderr, one line (``error: ...``) and a non-zero exit code: 2 for bad input or
  options (:class:`~fed_de.errors.FedDEError`, ``ValueError``), 1 for anything unexpected,
  with a hint to rerun with ``fed-de --debug`` for the traceback.
- The library logs to the ``fed_de`` logger; the commands print its records on stderr
  (warnings by default, information with ``--verbose``, errors only with ``--quiet``), and
  print the analysis' warnings (``FitWarning`` and others) after a run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

#: Global switches, set by the ``fed-de`` callback for the command that follows.
STATE = {"debug": bool(os.environ.get("FED_DE_DEBUG")), "quiet": False, "verbose": False}
console = Console()


# -- choices (typer lists them in --help and refuses anything else) --------------------------
class SizeFactors(str, Enum):
    """DESeq2's ``sfType``."""

    ratio = "ratio"
    poscounts = "poscounts"


class FitType(str, Enum):
    """DESeq2's ``fitType``."""

    parametric = "parametric"
    local = "local"
    mean = "mean"


class AltHypothesis(str, Enum):
    """DESeq2's ``altHypothesis``."""

    greaterAbs = "greaterAbs"  # noqa: N815 - R's spelling
    lessAbs = "lessAbs"  # noqa: N815
    greater = "greater"
    less = "less"


class Test(str, Enum):
    """DESeq2's ``test``."""

    Wald = "Wald"
    LRT = "LRT"


class Backend(str, Enum):
    """Where a plan runs."""

    simulation = "simulation"
    subprocess = "subprocess"
    remote = "remote"


class SiteKind(str, Enum):
    """What a registered site holds."""

    deseq2 = "deseq2"
    screen = "screen"


def value(option):
    """The plain value of an option (an Enum member's value)."""
    return option.value if isinstance(option, Enum) else option


# -- global switches, logging, errors ----------------------------------------------------------
class _EchoHandler(logging.Handler):
    """Log records as ``level: message`` lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


_HANDLER = _EchoHandler()


def configure(debug: bool = False, quiet: bool = False, verbose: bool = False) -> None:
    """Apply ``--debug``, ``--quiet`` and ``--verbose`` to this command."""
    STATE.update(debug=debug or bool(os.environ.get("FED_DE_DEBUG")), quiet=quiet,
                 verbose=verbose)
    console.quiet = quiet
    logger = logging.getLogger("fed_de")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(logging.ERROR if quiet else logging.DEBUG if debug
                    else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def _passthrough() -> tuple[type, ...]:
    """typer's own exceptions (usage errors, exits), which typer reports itself."""
    click_base = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    return (typer.Exit, typer.Abort, *click_base)


def cli_errors(command: str):
    """Decorate a command: bad input -> ``error: ...`` on stderr, exit 2; an unexpected
    exception -> one line and a ``--debug`` hint, exit 1 (``--debug``: the traceback)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from fed_de.errors import FedDEError

            try:
                return fn(*args, **kwargs)
            except _passthrough():
                raise
            except (FedDEError, ValueError, FileNotFoundError) as err:
                if STATE["debug"]:
                    raise
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(code=2) from None
            except Exception as err:  # noqa: BLE001 - the one-line report is the point
                if STATE["debug"]:
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                typer.echo(f"error: unexpected {type(err).__name__}: {first}", err=True)
                typer.echo(f"(run `fed-de --debug {command} ...` to see the traceback)",
                           err=True)
                raise typer.Exit(code=1) from None

        return wrapper

    return decorate


@contextlib.contextmanager
def record_failure(out: Path | None, command: list[str], **known):
    """Around a federated run: if a task fails (the error names its step), the network
    fails, or the run is interrupted, write ``out/run.json`` with ``status: "failed"``, the
    failed step, the site, the error and the facts so far (:func:`fed_de.files.
    failure_record`), then let the error through (``cli_errors`` prints it). Input refused
    before the first task writes nothing."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:  # an interrupted run is recorded too
        started = hasattr(err, "step") or hasattr(err, "facts")
        if out is not None and (started or isinstance(err, KeyboardInterrupt)):
            from fed_de.files import failure_record, write_json

            resume = {}
            try:
                resume = save_resume_seed(err, Path(out))
            except OSError as io_err:
                logging.getLogger("fed_de").warning("could not save the failed plan's state "
                                                    "in %s: %s", out, io_err)
            try:
                write_json(Path(out) / "run.json",
                           failure_record(err, command, **known, **resume), default=str)
            except OSError as io_err:  # the run's error is the one to report
                logging.getLogger("fed_de").warning("could not write %s/run.json: %s", out,
                                                    io_err)
        raise


def save_resume_seed(err: BaseException, out: Path) -> dict:
    """A failed Substra plan's downloaded seed (``err.resume``), written to ``out`` so that
    ``fed-de resume OUT`` continues it as a new plan (:mod:`fed_de.backends.resume`); what
    ``run.json`` says about it (``resume``: the plan, round and tasks reused, or why none)."""
    seed = getattr(err, "resume", None)
    if seed is None:
        why = getattr(err, "resume_error", None)
        return {"resume": {"available": False, "why": why}} if why else {}
    from fed_de.backends.resume import facts, save_seed

    path = save_seed(seed, out)
    logging.getLogger("fed_de").warning(
        "the failed plan's state after round %s is saved in %s: fix the cause, then continue "
        "it as a new compute plan with `fed-de resume %s`", seed.round_idx, out, out)
    return {"resume": {"available": True, **facts(seed), "seed_bytes": path.stat().st_size,
                       "how": f"fed-de resume {out}"}}


def report_warnings(caught: list) -> list[str]:
    """Print the caught warnings of fed_de (the analysis' ``FitWarning``, and fed_de's own
    notes, e.g. on two-site secure aggregation) as ``warning: ...`` lines on stderr, unless
    ``--quiet``; other libraries' warnings only with ``--verbose``. Return fed_de's
    messages, once each."""
    from fed_de.errors import FitWarning

    seen: list[str] = []
    for w in caught:
        text = str(w.message)
        ours = issubclass(w.category, FitWarning) or f"{os.sep}fed_de{os.sep}" in w.filename
        if not ours:
            if STATE["verbose"]:
                typer.echo(f"warning ({w.category.__name__}): {text}", err=True)
            continue
        if text not in seen:
            seen.append(text)
    if not STATE["quiet"]:
        for text in seen:
            typer.echo(f"warning: {text}", err=True)
    return seen


# -- commands that keep their raw arguments (run.json records the command line) ----------------
class FedDECommand(TyperCommand):
    """A typer command that records its raw arguments in ``ctx.meta["argv"]`` and reads
    ``--contrast FACTOR LEVEL REF`` (three words) as one value, so that ``--contrast`` can
    repeat and also take a coefficient name or comma-separated weights."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, join_contrast_words(args))


def join_contrast_words(args: list[str], option: str = "--contrast") -> list[str]:
    """``--contrast a b c`` -> ``--contrast "a b c"`` (up to three words that are not
    options); other arguments unchanged."""
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        if args[i] == option:
            words = []
            while (i + 1 < len(args) and len(words) < 3
                   and not args[i + 1].startswith("--")):
                words.append(args[i + 1])
                i += 1
            if words:
                out.append(" ".join(words))
        i += 1
    return out


def command_line(ctx, command: str) -> list[str]:
    """``fed-de COMMAND ARGS...`` as typed (from :class:`FedDECommand`)."""
    return ["fed-de", command, *ctx.meta.get("argv", [])]


# -- sites and facts ------------------------------------------------------------------------
def parse_sites(items: list[str], h5ad_only: bool = False) -> dict[str, Path]:
    """``NAME=PATH`` options -> {name: path}, with clear errors for bad or missing paths."""
    sites: dict[str, Path] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--site expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        if name in sites:
            raise typer.BadParameter(f"site name {name!r} given twice")
        p = Path(path)
        if not p.exists():
            raise typer.BadParameter(f"site {name!r}: {path} does not exist")
        if h5ad_only and p.is_file() and p.suffix != ".h5ad":
            raise typer.BadParameter(f"site {name!r}: {path} is not an .h5ad file")
        sites[name] = p
    if not sites:
        raise typer.BadParameter("give at least one --site NAME=PATH")
    return sites


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int | float) else "n/a"


def print_facts(facts: dict, title: str = "Run facts", console: Console | None = None) -> None:
    """A small table of a run's steps, tasks and bytes; a fact a backend does not report
    (the substra backends measure no received bytes, a remote run no bytes at all) prints as
    ``n/a``, and declared upper bounds are labelled so."""
    table = Table(title=title)
    table.add_column("fact")
    table.add_column("value", justify="right")
    table.add_row("sequential steps", _count(facts.get("sequential_steps")))
    table.add_row("tasks", _count(facts.get("tasks")))
    table.add_row("distinct functions", _count(facts.get("distinct_functions")))
    measured = facts.get("bytes_measured", True)
    kind = "bytes sent" if measured else "bytes sent (declared upper bound)"
    payload = facts.get("payload_bytes_by_site") or {}
    for site, b in (facts.get("bytes_sent_by_site") or {}).items():
        extra = f" (payload {_count(payload[site])})" if site in payload else ""
        table.add_row(f"{kind} by {site}", _count(b) + extra)
    table.add_row("bytes sent by aggregator", _count(facts.get("bytes_sent_by_aggregator")))
    if facts.get("n_jobs", 1) != 1:
        table.add_row("worker processes", _count(facts["n_jobs"]))
    wall = facts.get("wall_seconds")
    table.add_row("wall seconds", f"{wall:.3f}" if isinstance(wall, int | float) else "n/a")
    (console or Console()).print(table)
    if facts.get("bytes_note"):
        (console or Console()).print(f"bytes: {facts['bytes_note']}")
