"""`diffops quality RELEASE`: what users and reviewers said and what the scorer measured, per version.

Reads the state file read-only (`controller.state.feedback`, `controller.state.samples`), sums it with
`controller.quality.summarize` and prints a table, or the same keys as JSON or YAML (`-o`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from controller.cli.common import fail, state_dir_option, store_at
from controller.cli.output import choose, dump, output_option
from controller.quality import FLAGS, summarize
from controller.state.feedback import feedback_rows
from controller.state.samples import sample_rows

__all__ = ["quality", "quality_text"]


def quality_text(data: dict[str, Any]) -> str:
    """The report as plain lines: one block per version."""
    if not data["versions"]:
        return (f"{data['release']}: no feedback or samples stored yet; clients send feedback with POST "
                f"/{data['release']}/feedback, reviewers on the review page, and the controller stores it on its next reconcile")
    lines = [f"{data['release']}: {sum(v['feedback'] for v in data['versions'])} feedback on {len(data['versions'])} version(s)"]
    for v in data["versions"]:
        ratings, clip, nsfw = v["ratings"], v["clip_score"], v["nsfw"]
        mean = f"{ratings['mean']:.2f}" if ratings["mean"] is not None else "-"
        histogram = " ".join(f"{stars}★:{count}" for stars, count in ratings["histogram"].items())
        flags = ", ".join(f"{flag} {f['count']} ({f['rate']:.0%})" for flag, f in v["flags"].items())
        clip_mean = f"{clip['mean']:.2f}" if clip["mean"] is not None else "-"
        nsfw_rate = f"{nsfw['rate']:.0%}" if nsfw["rate"] is not None else "-"
        lines += [f"  {v['version']}: {v['feedback']} feedback ({v['reviews']} from reviewers), {ratings['count']} rated, "
                  f"mean {mean}, {v['comments']} comments",
                  f"    ratings  {histogram}", f"    flags    {flags}",
                  f"    samples  {v['samples']['count']} ({v['samples']['kept_for_review']} kept for review), CLIP score mean "
                  f"{clip_mean} of {clip['count']}, NSFW {nsfw_rate} of {nsfw['checked']} checked"]
    return "\n".join(lines)


@click.command()
@click.argument("release", metavar="RELEASE")
@state_dir_option
@output_option("text", "json", "yaml")
def quality(release: str, state_dir: Path, output: str) -> None:
    """Quality of RELEASE per version: feedback from users and reviewers, ratings (count, mean, 1-5 histogram), flags
    (count, rate), sampled outputs, their CLIP score and NSFW rate.

    Flags: nsfw, artifact, prompt_mismatch, other; a flag's rate is the share
    of the version's feedback that carries it. Read from the controller's
    state file, which the controller fills from the release's routers every
    reconcile (and the review page as reviewers rate).
    """
    path = state_dir / "state.db"
    if not path.exists():
        fail(f"no state file at {path}; run `diffops controller run` (or pass --state-dir)", 2)
    store = store_at(path)
    try:
        rows, samples = feedback_rows(store.db, release), sample_rows(store.db, release)
    finally:
        store.close()
    data = {"release": release, "flags": list(FLAGS), "versions": summarize(rows, samples)}
    fmt = choose(output)
    click.echo(quality_text(data) if fmt == "text" else dump(data, fmt))
