"""``ntrace pack`` and ``ntrace verify``: share a trace as one checksummed ``.zip``."""

from __future__ import annotations

import click
from rich.console import Console

from ntrace.cli import Command, fail_with_reasons, handle_errors
from ntrace.cli.text import size, visible


@click.command(cls=Command, short_help="Pack a trace into one checksummed .zip file.")
@click.argument("trace")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="replace OUT if it is a trace packed by ntrace")
@click.option("--validate", "deep", is_flag=True,
              help="validate every committed row first (default: structure only)")
@handle_errors
def pack(trace: str, out: str, overwrite: bool, deep: bool) -> None:
    """Pack TRACE (a directory, .zip or URL) into the single file OUT (.zip) with a manifest
    of SHA-256 checksums; every ntrace command reads OUT directly."""
    from ntrace.cli.progress import Bars
    from ntrace.format.pack import pack_trace

    with Bars(Console(stderr=True)) as bars:
        result = pack_trace(trace, out, overwrite=overwrite, validate=deep, progress=bars)
    c = result.commit
    note = "" if result.status == "complete" else f", status {result.status}"
    click.echo(visible(f"packed {trace} → {result.path}: {result.objects} objects, "
                       f"{size(result.bytes)}, format {result.format_version}, {c['rounds']} "
                       f"rounds, {c['taylor_rounds']} Taylor rounds, {c['snapshots']} "
                       f"snapshots{note}"))
    click.echo(f"manifest sha256 {result.manifest_sha256} (share it apart from the file; "
               "`ntrace verify --digest` checks it)")
    if result.skipped:
        more = f" and {len(result.skipped) - 3} more" if len(result.skipped) > 3 else ""
        click.echo(visible(f"left out {len(result.skipped)} stray file(s) that belong to no "
                           f"node: {', '.join(result.skipped[:3])}{more}"), err=True)


@click.command(cls=Command, short_help="Check every checksum of a packed trace.")
@click.argument("archive", type=click.Path())
@click.option("--digest", metavar="HEX", default=None,
              help="the manifest's SHA-256 printed by `ntrace pack`: pins the whole archive")
@handle_errors
def verify(archive: str, digest: str | None) -> None:
    """Check every member of ARCHIVE (made by `ntrace pack`) against the SHA-256 in its
    manifest; exit 1 listing every mismatch. This catches accidents, not tampering: with
    --digest (obtained from the packer, not from the archive) it catches that too."""
    from ntrace.cli.progress import Bars
    from ntrace.format.pack import verify_pack

    with Bars(Console(stderr=True)) as bars:
        report = verify_pack(archive, progress=bars, digest=digest)
    if report.ok:
        m = report.manifest or {}
        c = m.get("commit") or {}
        click.echo(visible(f"verified: {archive}: {report.objects} objects match their SHA-256 "
                           f"(format {m.get('format_version')}, {c.get('rounds')} rounds, "
                           f"status {m.get('status')})") + ("; the manifest matches the pinned "
                                                            "digest" if digest else ""))
        return
    fail_with_reasons("corrupt", archive, list(report.reasons))
