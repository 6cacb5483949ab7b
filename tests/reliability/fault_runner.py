"""Run `scope` commands and kill them with SIGKILL at chosen moments, to test resumption.

    python fault_runner.py PLAN.json RESULT.json

PLAN.json: {"root": RUN_FOLDER, "attempts": [{"args": [...], "kill": {"after": REGEX, "at": J} | null,
"log_events": bool, "output": FILE | null}, ...]}; an attempt {"parallel": [attempt, ...]} starts its
attempts together and waits for all of them. Each attempt is the `scope` command line `args`, run in a
child process forked from this one (which has imported torch, transformers and the stages once, so an
attempt starts in milliseconds instead of seconds). The child watches its own file-system operations
with an audit hook (`sys.addaudithook`): every open, rename, remove, mkdir and temporary file whose
path is inside the run folder is an event. With a kill spec, the child sends itself SIGKILL at the
J-th event counted from the first one whose path (relative to the run folder) matches REGEX (a
stage's folder: J inside that stage's stretch of events): between two file operations, the moments
that decide what a killed process leaves on disk. The kill is a real SIGKILL: no `finally`, no
atexit, no flush.

RESULT.json: one record per attempt: {"status": "killed" | "exit", "code", "kill": {"event", "path",
"events"} (the event it died at), "events": [[event, path], ...] when log_events, "done": the
finished manifests after the attempt (`done_manifests`)}.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

WARM_IMPORTS = (
    "polars", "safetensors.torch", "torch", "torch.distributed.checkpoint.state_dict",
    "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama", "scope_cli.cli.app", "scope_cli.cli.rounds", "scope_cli.backends.training",
    "scope_cli.backends.generation", "scope_cli.backends.guide", "scope_cli.backends.prm",
    "scope_cli.backends.verifier", "stages.prepare", "stages.generate", "stages.verify", "stages.prm_score",
    "stages.locate_error", "stages.rectify", "stages.train_step", "stages.eval",
)
WATCHED = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.link",
           "shutil.rmtree", "shutil.copyfile", "tempfile.mkstemp", "tempfile.mkdtemp"}


def done_manifests(root: str | Path) -> dict[str, str]:
    """relative path -> hash of every manifest whose output is there with its recorded size: the
    shards (and train-steps) that are finished. A rewritten one was recomputed."""
    out = {}
    for man in Path(root).rglob("_manifest/*.json"):
        if any(part.startswith(".") for part in man.relative_to(root).parts):
            continue
        try:
            data = man.read_bytes()
            output = json.loads(data)["output"]
            if (man.parent.parent / output["path"]).stat().st_size == output["size"]:
                out[str(man.relative_to(root))] = hashlib.sha256(data).hexdigest()
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return out


def child(root: str, attempt: dict, record_path: Path) -> None:
    """Runs in the forked child: install the hook, run the command, exit with its code."""
    kill = attempt.get("kill")
    after = re.compile(kill["after"]) if kill else None
    state = {"events": 0, "armed": 0, "busy": False, "log": []}

    def hook(event: str, args: tuple) -> None:
        if event not in WATCHED or state["busy"] or not args:
            return
        path = args[0]
        if isinstance(path, int) or path is None:
            return
        path = os.fsdecode(os.fspath(path))
        if not path.startswith(root + os.sep):
            return
        rel = path[len(root) + 1:]
        state["events"] += 1
        if attempt.get("log_events"):
            state["log"].append([event, rel])
        if after is not None and (state["armed"] or after.search(rel)):
            state["armed"] += 1
            if state["armed"] == kill["at"]:
                state["busy"] = True
                record_path.write_text(json.dumps({"status": "killed", "kill": {
                    "event": event, "path": rel, "events": state["events"]}}))
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    from scope_cli.cli.app import app

    try:
        code = app(attempt["args"], prog_name="scope", standalone_mode=False)
    except SystemExit as exc:  # typer.Exit raised outside click's handling
        code = exc.code
    except BaseException as exc:  # a traceback is a failure of the test, not a crash to hide
        import traceback

        traceback.print_exc()
        code = f"{type(exc).__name__}: {exc}"
    state["busy"] = True
    record_path.write_text(json.dumps({"status": "exit", "code": code if code is not None else 0,
                                       "events": state["log"], "total_events": state["events"]}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    root = os.path.abspath(plan["root"])
    # everything an attempt imports, once (transformers loads its model classes lazily): children
    # start warm
    for module in WARM_IMPORTS:
        importlib.import_module(module)

    results = []
    for k, attempt in enumerate(plan["attempts"]):
        # {"parallel": [attempt, ...]}: processes started together (two workers on one run)
        group = attempt.get("parallel", [attempt])
        start = time.perf_counter()
        running = []
        for j, one in enumerate(group):
            record = out_path.with_name(f"{out_path.stem}.attempt-{k}-{j}.json")
            record.unlink(missing_ok=True)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    if one.get("output"):  # this process's stdout and stderr, to a file
                        fd = os.open(one["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        os.dup2(fd, 1)
                        os.dup2(fd, 2)
                    child(root, one, record)
                finally:
                    os._exit(3)
            running.append((one, pid, record))
        done = []
        for one, pid, record in running:
            _, status = os.waitpid(pid, 0)
            result = json.loads(record.read_text()) if record.exists() else {"status": "lost"}
            if os.WIFSIGNALED(status):
                result["signal"] = os.WTERMSIG(status)
            done.append({"args": one["args"], **result})
        summary = {"done": done_manifests(root), "seconds": round(time.perf_counter() - start, 2)}
        results.append({**done[0], **summary} if "parallel" not in attempt
                       else {"parallel": done, **summary})
    out_path.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
