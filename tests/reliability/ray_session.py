"""The local Ray session as the test process sees it: its worker processes (to SIGKILL an actor in the middle of a
job) and its log files (to search them for credentials). Read from /proc: psutil is not a dependency here, and
Ray's state API needs the dashboard, which the test cluster runs without."""
from __future__ import annotations

import os
import signal
from pathlib import Path


def children() -> dict[int, list[int]]:
    """pid -> the pids of its running children (zombies, killed but not yet reaped, are left out)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # the name field may hold spaces and parentheses
        if state != "Z":
            kids.setdefault(int(ppid), []).append(int(entry))
    return kids


def title(pid: int) -> str:
    """A process's title (Ray workers set it: ``ray::MapWorker(MapBatches(RefineActor)).submit`` ...)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def workers(part: str, root: int | None = None) -> list[tuple[int, str]]:
    """(pid, title) of the processes under ``root`` (default: this one, which started the local cluster) whose
    title contains ``part``: never a process of another Ray cluster on the same machine."""
    kids, found, todo = children(), [], [root or os.getpid()]
    while todo:
        for child in kids.get(todo.pop(), []):
            todo.append(child)
            name = title(child)
            if part in name:
                found.append((child, name))
    return found


def kill_busy(part: str) -> tuple[int, str] | None:
    """SIGKILLs one process of ours titled ``part`` that is running a task (its title names the method) and
    returns (pid, title); None when none is busy right now."""
    for pid, name in workers(part):
        if ".submit" in name:
            os.kill(pid, signal.SIGKILL)
            return pid, name
    return None


def session_logs() -> list[Path]:
    """Every file under this process's Ray session's log folder (workers, raylet, GCS, Ray Data)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def files_holding(files, needles: list[str]) -> dict[str, list[str]]:
    """file -> the needles found in its bytes."""
    found = {}
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        hits = [n for n in needles if n.encode() in data]
        if hits:
            found[str(path)] = hits
    return found
