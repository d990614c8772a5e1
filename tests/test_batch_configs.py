"""The scheduled-job examples in ``configs/batch``: their commands run, as written, on real
files (paths moved into a temporary folder), and the units and manifest say what README
says they do."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fastserve.demo import load_split

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "batch"


def unit(name: str) -> dict[str, dict[str, str]]:
    """A systemd unit's sections and settings (continued lines joined, as systemd does)."""
    text = (CONFIGS / name).read_text().replace("\\\n", " ")
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current[key] = value
    return sections


def scored_day(root: Path, repo: Path) -> tuple[Path, Path]:
    """Today's input under ``root`` (as the examples name it), and where its output goes."""
    split = load_split("breast_cancer")
    frame = pd.DataFrame(split.x_test, columns=list(split.feature_names))
    frame.insert(0, "id", range(len(frame)))
    day = datetime.date.today().isoformat()
    incoming = root / "incoming" / f"{day}.parquet"
    incoming.parent.mkdir(parents=True)
    (root / "scored").mkdir()
    frame.to_parquet(incoming)
    return incoming, root / "scored" / f"{day}.parquet"


def test_the_systemd_service_runs_the_job_it_describes(repo: Path, tmp_path: Path) -> None:
    service = unit("fastserve-batch.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "3"
    assert service["SuccessExitStatus"] == "1"
    timer = unit("fastserve-batch.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:00:00" and timer["Timer"]["Persistent"]
    command = service["ExecStart"].replace("%%", "%")  # systemd's escape
    root = tmp_path / "srv"
    _, output = scored_day(root, repo)
    command = command.replace("/srv/fastserve/models", str(repo))
    command = command.replace("/srv/fastserve", str(root))
    argv = re.match(r"/bin/sh -c '(.*)'$", command.strip())
    assert argv is not None, command
    fastserve = Path(sys.executable).with_name("fastserve")
    env = {**os.environ, "FASTSERVE_BIN": str(fastserve)}
    run = subprocess.run(["/bin/sh", "-c", argv.group(1)], env=env, capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(pd.read_parquet(output)) == len(load_split("breast_cancer").x_test)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    for name in ("fastserve-batch.service", "fastserve-batch.timer"):
        shutil.copy(CONFIGS / name, tmp_path / name)
    check = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in
                                        ("fastserve-batch.service", "fastserve-batch.timer"))],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = [line for line in check.stderr.splitlines() if "fastserve-batch" in line]
    assert not problems, check.stderr


def test_the_cronjob_runs_the_job_it_describes(repo: Path, tmp_path: Path) -> None:
    manifest = yaml.safe_load((CONFIGS / "cronjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "CronJob")
    spec = manifest["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy requires
    (rule, _) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [3]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert {v["name"] for v in pod["volumes"]} == set(mounts)
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    root = tmp_path / "data"
    _, output = scored_day(root, repo)
    script = script.replace(mounts["models"], str(repo)).replace(mounts["data"], str(root))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(pd.read_parquet(output)) == len(load_split("breast_cancer").x_test)
