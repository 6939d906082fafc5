"""The fleet commands of the `pocketlm` app: keygen, pack, diff, install, rollback, verify, shadow, gate,
promote, cost (registered on cli.app)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli import _threads, app, out

KEY_HELP = "Ed25519 private key (.key from pocketlm keygen) that signs the package."
ENC_HELP = "AES-256-GCM key file (32 bytes or 64 hex); default: $POCKETLM_PACKAGE_KEY, else not encrypted."


@app.command("keygen")
def keygen_cmd(name: Path = typer.Argument(..., help="Writes NAME.key (private, mode 600) and NAME.pub."),
               overwrite: bool = typer.Option(False, help="Replace existing key files.")):
    """Make an Ed25519 signing key pair for packages."""
    from .fleet.keys import generate
    priv, pub = generate(name, overwrite)
    out.print(f"wrote {priv} (keep it secret) and {pub} (give it to devices: install --trust)")


@app.command("pack")
def pack_cmd(artifact: Path = typer.Argument(..., help="Artifact directory to package."),
             output: Path = typer.Option(..., "-o", "--output", help="Package file to write."),
             key: Path = typer.Option(..., help=KEY_HELP),
             version: str = typer.Option(..., help="This package's version (e.g. 1, 1.2)."),
             name: Optional[str] = typer.Option(None, help="Model name in the manifest (default: the directory's)."),
             encrypt_key: Optional[Path] = typer.Option(None, help=ENC_HELP)):
    """Sign ARTIFACT into a package: per-tensor manifest, files, version; optionally encrypted."""
    from .fleet.keys import encryption_key
    from .fleet.package import pack
    m = pack(artifact, output, key, version=version, name=name, encrypt_key=encryption_key(encrypt_key))
    out.print(f"wrote {output}: {m['name']} {m['version']}, {len(m['files'])} files, {len(m['tensors'])} tensors, "
              f"{output.stat().st_size / 2**20:.1f} MB" + (" (encrypted)" if encrypt_key or _env_key() else ""))


def _env_key() -> bool:
    import os
    from .fleet.keys import KEY_ENV
    return bool(os.environ.get(KEY_ENV))


@app.command("diff")
def diff_cmd(old: Path = typer.Argument(..., help="Full package of the base version."),
             new: Path = typer.Argument(..., help="Full package of the new version."),
             output: Path = typer.Option(..., "-o", "--output", help="Delta package to write."),
             key: Path = typer.Option(..., help=KEY_HELP + " Both packages must verify with it."),
             decrypt_key: Optional[Path] = typer.Option(None, help="Key of encrypted inputs (default: $POCKETLM_PACKAGE_KEY)."),
             encrypt_key: Optional[Path] = typer.Option(None, help=ENC_HELP)):
    """A delta from OLD to NEW: only changed files and, in weight files, only the changed tensors."""
    from .fleet.keys import encryption_key
    from .fleet.package import diff
    k = encryption_key(decrypt_key)
    m = diff(old, new, output, key, old_key=k, new_key=k, encrypt_key=encryption_key(encrypt_key))
    size, full = output.stat().st_size, new.stat().st_size
    out.print(f"wrote {output}: {m['base_version']} → {m['version']}, {size / 2**20:.2f} MB "
              f"({size / full:.1%} of the full package)")


@app.command("install")
def install_cmd(package: Path = typer.Argument(..., help="Package or delta file."),
                into: Path = typer.Option(..., help="Install directory on this device."),
                trust: Path = typer.Option(..., help="Public key (.pub) the package must be signed with."),
                allow_downgrade: bool = typer.Option(False, help="Accept a version older than the active one."),
                decrypt_key: Optional[Path] = typer.Option(None, help="Key of an encrypted package (default: $POCKETLM_PACKAGE_KEY)."),
                activate: bool = typer.Option(True, "--activate/--no-activate",
                                              help="--no-activate: install beside the active version (promote later).")):
    """Verify and install a package; the active version switches only after every tensor re-hashes."""
    from .fleet.install import install
    from .fleet.keys import encryption_key
    r = install(package, into, trust, allow_downgrade=allow_downgrade, enc_key=encryption_key(decrypt_key),
                activate=activate)
    out.print(f"installed {r['kind']} package, version {r['version']} → {r['path']}"
              + (" (active)" if r["active"] else " (not active: pocketlm promote)"))


@app.command("rollback")
def rollback_cmd(into: Path = typer.Option(..., help="Install directory."),
                 to: Optional[str] = typer.Option(None, help="Version to activate (default: the previous one).")):
    """Make the previous (or a given) installed version active again."""
    from .fleet.install import rollback
    r = rollback(into, to)
    out.print(f"active version {r['from']} → {r['to']}")


@app.command("verify")
def verify_cmd(into: Path = typer.Argument(..., help="Install directory.")):
    """Re-check the active version: signature, every file and every tensor against its manifest."""
    from .fleet.install import verify_install
    r = verify_install(into)
    out.print(f"{r['name']} {r['version']}: signature and {r['files']} files, {r['tensors']} tensors verified "
              f"(manifest {r['manifest'][:16]})")


@app.command("shadow")
def shadow_cmd(incumbent: str = typer.Option(..., help="Model now in service (dir, install dir or name)."),
               candidate: str = typer.Option(..., help="Model to try beside it."),
               requests: Path = typer.Option(..., help="JSONL: prompt or messages, optional answer, max_tokens."),
               output: Path = typer.Option(..., "-o", "--output", help="Shadow report JSON to write."),
               max_tokens: int = typer.Option(64, help="Most new tokens per request."),
               ppl_tokens: int = typer.Option(8192, help="Held-out tokens for each model's perplexity (0: skip)."),
               threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores).")):
    """Run CANDIDATE on the same requests as INCUMBENT: agreement, task accuracy, KL, latency, memory."""
    from .fleet.shadow import read_requests, run_shadow
    from .io import atomic_write_text, check_output
    items = read_requests(requests)
    check_output(output, overwrite=True)
    _threads(threads)
    r = run_shadow(incumbent, candidate, items, max_tokens=max_tokens, ppl_tokens=ppl_tokens)
    atomic_write_text(output, json.dumps(r, indent=1) + "\n")
    table = Table(title=f"pocketlm shadow ({len(items)} requests, greedy)")
    cols = ("task_accuracy", "agreement", "kl_mean", "ppl", "ppl_ratio", "p50_latency_ms", "p95_latency_ms",
            "tokens_per_s", "disk_mb", "rss_mb")
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for side in ("incumbent", "candidate"):
        s = r[side]
        table.add_row(f"{side}: {s['model']}", *("-" if s.get(c) is None else f"{s[c]:.4g}" for c in cols))
    out.print(table)
    out.print(f"wrote {output}")


def gate_table(results) -> Table:
    table = Table(title="acceptance gates")
    for c in ("gate", "value", "threshold", "result"):
        table.add_column(c, justify="left" if c == "gate" else "right")
    for g in results:
        table.add_row(g.gate, "-" if g.value is None else f"{g.value:.4g}",
                      "-" if g.threshold is None else f"{g.threshold:.4g}",
                      "[green]pass[/green]" if g.passed else f"[red]FAIL[/red] {g.reason}")
    return table


def _check(report: Path, gates: Path) -> bool:
    from .fleet.gates import check_gates, load_gates, read_report
    passed, results = check_gates(read_report(report), load_gates(gates))
    out.print(gate_table(results))
    return passed


@app.command("gate")
def gate_cmd(report: Path = typer.Argument(..., help="Shadow report (or any JSON with candidate/incumbent)."),
             gates: Path = typer.Option(..., help="YAML list of gates, e.g. 'agreement >= 0.95'.")):
    """Check a report against acceptance gates: exit 0 when all pass, 1 when any fails."""
    passed = _check(report, gates)
    out.print("all gates pass" if passed else "gates FAILED")
    raise typer.Exit(0 if passed else 1)


@app.command("promote")
def promote_cmd(into: Path = typer.Option(..., help="Install directory."),
                version: str = typer.Option(..., help="Installed version to activate (install --no-activate)."),
                report: Path = typer.Option(..., help="Shadow report of that version against the active one."),
                gates: Path = typer.Option(..., help="Gates it must pass.")):
    """Activate VERSION if the report passes the gates (exit 1 and nothing changes otherwise)."""
    from .fleet.install import rollback
    if not _check(report, gates):
        out.print(f"gates FAILED: version {version} stays inactive")
        raise typer.Exit(1)
    r = rollback(into, version)  # the same verified switch
    out.print(f"promoted: active version {r['from']} → {r['to']}")


@app.command("cost")
def cost_cmd(report: Path = typer.Argument(..., help="EvalReport JSON (pocketlm eval --json)."),
             kwh_price: float = typer.Option(0.30, help="Electricity price per kWh."),
             hardware_price: float = typer.Option(1000.0, help="Price of the machine."),
             lifetime_years: float = typer.Option(3.0, help="Years the machine serves."),
             utilization: float = typer.Option(0.5, help="Share of that time it is busy."),
             tokens_per_request: float = typer.Option(256.0, help="Generated tokens per request."),
             cloud_price: Optional[float] = typer.Option(None, help="A cloud price per 1M tokens to compare with.")):
    """Cost per 1M tokens and per 1,000 requests from an eval report's J/token and tok/s."""
    from .fleet.cost import CostInputs, cost_from_eval_report
    from .fleet.gates import read_report
    c = cost_from_eval_report(read_report(report), CostInputs(kwh_price, hardware_price, lifetime_years, utilization,
                                                              tokens_per_request, cloud_price))
    table = Table(title="cost" + (" (energy estimated)" if c["estimated"] else " (energy measured)"))
    for col in ("energy / 1M tok", "hardware / 1M tok", "total / 1M tok", "per 1,000 requests", "cloud / 1M tok",
                "× cloud"):
        table.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    table.add_row(*(fmt(c[k]) for k in ("energy_per_1m_tokens", "hardware_per_1m_tokens", "total_per_1m_tokens",
                                        "per_1000_requests", "cloud_per_1m_tokens", "ratio_to_cloud")))
    out.print(table)
