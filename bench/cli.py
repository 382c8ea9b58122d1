"""`overlayctl bench` / `python -m bench`: run the benchmarks, write JSON, plots and the table.

Design notes
- One click command, `bench_command`, so overlayctl registers it beside its other optional
  commands and `python -m bench` runs the same thing. WHICH is throughput, latency,
  convergence, scale, cni, moves, all (every one, in that order) or report (only regenerate the
  table and plots from the JSON already there).
- Full runs by default; `--smoke` gives the tiny sizes `make test` uses. Options override one
  knob of the chosen profile (`--repeats`, `--seconds`, `--hosts`, `--peers`, `--joins`,
  `--idle-seconds`, `--moves`) without touching the others. `--hosts` is a list for convergence;
  moves takes its one value (the largest, when several are given).
- A failing benchmark does not stop `all`: the others still run, the report is regenerated from
  whatever JSON exists, and the command exits non-zero naming what failed.
- cni: the CNI plugin's benchmark lives with its authors in bench/cni*.py. The contract: a
  module there with `run(results_dir: Path, smoke: bool, progress) -> dict` that writes
  `<results_dir>/cni.json` (with a `table` field, see bench.report). Until one exists, `cni`
  says it is not yet available. (bench/cni_bench.py is that module.)
- moves (issue 7): bench.moves, `run(results_dir, hosts, moves, progress)`; 10 hosts and 5 moves
  in full, 3 hosts and 1 move in smoke (the least it needs: a TCP client on neither end).
- SIGTERM is turned into KeyboardInterrupt, so a killed run still tears its lab down.
- Heavy imports (the lab, matplotlib) happen inside the command, so `overlayctl --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import click

BENCHMARKS = ("throughput", "latency", "convergence", "scale", "cni", "moves")


def _ints(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers") from None


def find_cni_benchmark():
    """The CNI benchmark module (bench/cni*.py with a run function), or None."""
    here = Path(__file__).resolve().parent
    for path in sorted(here.glob("cni*.py")):
        module = importlib.import_module(f"bench.{path.stem}")
        if callable(getattr(module, "run", None)):
            return module
    return None


def run_benchmark(name: str, results_dir: Path, smoke: bool, overrides: dict, quiet: bool = False) -> dict | None:
    """Run one benchmark with the smoke or full profile and the given overrides; None if unavailable."""
    from .common import Progress
    progress = Progress(name, quiet=quiet)
    if name == "throughput":
        from . import throughput as module
        options = module.ThroughputOptions.smoke() if smoke else module.ThroughputOptions()
        options = replace(options, **{k: v for k, v in overrides.items() if k in ("repeats", "seconds") and v is not None})
    elif name == "latency":
        from . import latency as module
        options = module.LatencyOptions.smoke() if smoke else module.LatencyOptions()
        options = replace(options, **{k: v for k, v in overrides.items() if k in ("repeats",) and v is not None})
    elif name == "convergence":
        from . import convergence as module
        options = module.ConvergenceOptions.smoke() if smoke else module.ConvergenceOptions()
        extra = {"sizes": overrides.get("hosts"), "joins": overrides.get("joins")}
        options = replace(options, **{k: v for k, v in extra.items() if v is not None})
    elif name == "scale":
        from . import scale as module
        options = module.ScaleOptions.smoke() if smoke else module.ScaleOptions()
        extra = {"sizes": overrides.get("peers"), "repeats": overrides.get("repeats"),
                 "idle_seconds": overrides.get("idle_seconds")}
        options = replace(options, **{k: v for k, v in extra.items() if v is not None})
    elif name == "cni":
        module = find_cni_benchmark()
        if module is None:
            progress("not yet available (the CNI benchmark, bench/cni*.py, does not exist yet)")
            return None
        return module.run(results_dir, smoke=smoke, progress=progress)
    elif name == "moves":
        from . import moves as module
        sizes = dict(module.SMOKE) if smoke else {"hosts": 10, "moves": 5}
        if overrides.get("hosts"):
            sizes["hosts"] = max(overrides["hosts"])
        if overrides.get("moves") is not None:
            sizes["moves"] = overrides["moves"]
        return module.run(results_dir, hosts=sizes["hosts"], moves=sizes["moves"], progress=progress)
    else:
        raise click.BadParameter(f"unknown benchmark {name!r}")
    return module.run(results_dir, options, progress)


@click.command("bench")
@click.argument("which", type=click.Choice([*BENCHMARKS, "all", "report"]), default="all")
@click.option("--smoke", is_flag=True, help="tiny sizes and 1 s runs (what `make test` runs)")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where JSON, plots and README.md go [default: bench/results]")
@click.option("--repeats", type=int, help="rounds per figure (throughput, latency, scale)")
@click.option("--seconds", type=float, help="throughput: seconds per iperf3 run")
@click.option("--hosts", "hosts", help="convergence: host counts, e.g. 2,5,10,20,50; moves: one host count")
@click.option("--joins", type=int, help="convergence: joins per host count")
@click.option("--peers", "peers", help="scale: peer counts, e.g. 1000,5000")
@click.option("--idle-seconds", type=float, help="scale: the idle CPU window")
@click.option("--moves", "moves", type=int, help="moves: how many moves")
@click.option("--quiet", is_flag=True, help="no progress lines")
def bench_command(which, smoke, results_dir, repeats, seconds, hosts, joins, peers, idle_seconds, moves, quiet):
    """Benchmarks against the references, in a lab of their own: WHICH of throughput, latency,
    convergence, scale, cni, moves, all; or report (redraw table and plots from the JSON)."""
    from .common import RESULTS_DIR
    from .report import write_report
    results_dir = results_dir or RESULTS_DIR
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so every lab's finally tears it down.
    signal.signal(signal.SIGTERM, _interrupt)
    if which != "report" and os.geteuid() != 0:
        raise click.ClickException("the benchmarks build a lab: run as root")
    overrides = {"repeats": repeats, "seconds": seconds, "hosts": _ints(hosts), "joins": joins,
                 "peers": _ints(peers), "idle_seconds": idle_seconds, "moves": moves}
    failed = []
    names = BENCHMARKS if which == "all" else (() if which == "report" else (which,))
    for name in names:
        try:
            run_benchmark(name, results_dir, smoke, overrides, quiet)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken benchmark must not cost the others their run
            traceback.print_exc()
            click.echo(f"bench {name} failed: {exc}", err=True)
            failed.append(name)
    readme = write_report(results_dir)
    click.echo(f"table: {readme}")
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    bench_command(prog_name=f"{Path(sys.executable).name} -m bench")
