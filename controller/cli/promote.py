"""`diffops experiment promote RUN_ID --release NAME`: an experiment cell as a release pull request.

Reads the cell's MLflow run, writes the release change as a commit on a new
branch (`controller.tracking.promote`; the checked-out branch, index and work
tree are left alone), and prints the `diffops diff BASE..BRANCH` markdown for
the pull request (`controller.plan.report`) on stdout, what was done and what
to do next on stderr. Exit 1: the run, the release or the branch refuses
(nothing is left behind); 2: the repository or tracking store cannot be read.
`--dry-run` builds the same commit object to read the plan from but points no
branch at it (unreferenced, `git gc` prunes it).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from controller.cli.common import fail, open_source, release_at, repo_option, state_dir_option, tracker_at, tracking_option
from controller.cli.plan_inputs import planned_changes
from controller.parse.edit import Scalar
from controller.plan.report import as_markdown
from controller.source.git_source import ReleaseSource, SourceError
from controller.tracking.mlflow_store import TrackingError
from controller.tracking.promote import (
    PromoteError,
    branch_exists,
    cell_values,
    commit_message,
    commit_release,
    create_branch,
    edited_release,
    read_cell,
    release_changes,
    subject,
)

__all__ = ["next_steps", "plan_markdown", "promote"]

_RENDERED = ("spec.model.", "spec.generation.sampler", "spec.generation.steps", "spec.generation.guidance_scale",
             "spec.generation.width", "spec.generation.height", "spec.generation.negative_prompt")  # what a golden render uses


def plan_markdown(source: ReleaseSource, base: str, target: str, path: str, state_dir: Path) -> str:
    """`diffops diff BASE..TARGET -o markdown`, read from the commits as git holds them; the promoted file must lint."""
    before = source.snapshot(base)
    after = source.snapshot(target, base=before)
    ours = [str(error) for error in after.errors if error.file == path]
    if ours:
        raise PromoteError(f"{path} does not lint at the new commit: {'; '.join(ours)}")
    return as_markdown(planned_changes(source, before.releases, after.releases, target, state_dir), after.errors, base, target)


def next_steps(release: str, branch: str, title: str, changes: dict[str, Scalar], golden: str | None) -> list[str]:
    """What to do after the branch exists: refresh the golden reference if the render changed, push, open the PR."""
    steps = []
    if golden and any(name.startswith(_RENDERED) for name in changes):
        steps.append(f"the golden reference {golden} was rendered with the old config and the gate compares against it: "
                     f"`git switch {branch}`, `diffops golden {release} --write`, commit {golden}")
    steps += [f"git push -u origin {branch}",
              f"open a pull request with the plan above (stdout; save it, e.g. > PLAN.md) as its description: "
              f"gh pr create --head {branch} --title {title!r} --body-file PLAN.md"]
    return steps


@click.command("promote")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--release", "release_name", required=True, metavar="NAME", help="Release to change (releases/NAME.yaml).")
@click.option("--branch", default=None, metavar="BRANCH", help="Branch to create (default: experiment/<first 8 of RUN_ID>).")
@click.option("--rev", default=None, help="Revision the branch starts from (default: HEAD).")
@click.option("--dry-run", is_flag=True, help="Print the plan; create no branch.")
@repo_option
@state_dir_option
@tracking_option
def promote(run_id: str, release_name: str, branch: str | None, rev: str | None, dry_run: bool, repo: str, state_dir: Path,
            tracking_uri: str | None) -> None:
    """Write the model and generation config of experiment cell RUN_ID into release NAME, as a commit on a new branch.

    Only the fields that differ change (model uri, digest, dtype; sampler,
    steps, guidance scale, size, negative prompt), comments kept. The cell's
    seed is taken only by a release that pins a seed; one with seed: null
    keeps drawing a random seed per request. The commit message links the run
    and lists its figures. Your checked-out branch and work tree are not
    touched. Prints the `diffops diff` markdown of the change for the pull
    request (stdout) and the next steps (stderr).
    """
    started = time.monotonic()
    source = open_source(repo, state_dir)
    if source.url:
        fail(f"{source.url}: promote writes a branch in a local clone; clone the repository and pass --repo PATH", 2)
    branch = branch or f"experiment/{run_id[:8]}"
    if not dry_run and branch_exists(source.repo, branch):
        fail(f"branch {branch} exists; pass another with --branch, or delete it (git branch -D {branch})")
    release, base = release_at(source, release_name, rev)
    path = f"releases/{release_name}.yaml"
    blob = source.blob(base, path)
    if blob is None:
        fail(f"release {release_name} is not in {path} at {base[:12]}; promote edits releases/NAME.yaml only")
    try:
        cell, link = read_cell(tracker_at(state_dir, tracking_uri), run_id)
        values = cell_values(cell.params)
        changes = release_changes(release.spec, values)
        if not changes:
            fail(f"{release_name} at {base[:12]} already has the config of cell {cell.cell}; nothing to promote")
        edited, _ = edited_release(blob.data_stream.read().decode("utf-8"), path, changes)
        title = subject(release_name, cell, values, changes)
        sha = commit_release(source.repo, base, path, edited, commit_message(release_name, cell, link, values, changes, release.spec))
        markdown = plan_markdown(source, base, sha, path, state_dir)
        if not dry_run:
            create_branch(source.repo, branch, sha)
    except TrackingError as err:
        fail(str(err), 2)
    except SourceError as err:
        fail(str(err), 2)
    except PromoteError as err:
        fail(str(err))
    click.echo(markdown)
    if cell.release and cell.release != release_name:
        click.echo(f"note: experiment {cell.experiment} started from release {cell.release}, not {release_name}", err=True)
    fields = ", ".join(name.removeprefix("spec.") for name in changes)
    if dry_run:
        click.echo(f"{release_name}: dry run, no branch created; {branch} would change {fields} "
                   f"({time.monotonic() - started:.1f}s)", err=True)
        return
    golden = release.spec.checks.golden.reference if release.spec.checks.golden is not None else None
    click.echo(f"{release_name}: committed {sha[:12]} on new branch {branch} from {base[:12]}, changing {fields}; your "
               f"checkout is unchanged ({time.monotonic() - started:.1f}s)", err=True)
    for step in next_steps(release_name, branch, title, changes, golden):
        click.echo(f"next: {step}", err=True)
