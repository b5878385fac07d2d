"""Faults where they happen: a process killed inside a checkpoint write, a disk that refuses the write, a
damaged latest checkpoint, and weights changed under an unchanged config. What each showed is listed
in tests/README.md.

The faults are injected from the tests (orbax's own functions patched in the test process or in a
child process started for the purpose); the engine has no test hooks.
"""
import errno
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import engine_toy as toy
import study_runner as runner
from embjax import extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child runs the toy study with one orbax function patched to SIGKILL the process when it works on
# the checkpoint after batch 4 (the one after batch 2 is complete by then).
_CHILD = textwrap.dedent('''
    import os, signal, sys
    import engine_toy as toy
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
    from orbax.checkpoint._src.path import async_path

    mode, workdir = sys.argv[1], sys.argv[2]
    STEP_TMP = "4.orbax-checkpoint-tmp"  # orbax's temporary name for the checkpoint after batch 4
    TARGET = "/" + STEP_TMP + "/"

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "meta":  # the state's arrays are written, the checkpoint's JSON meta not yet
        real_json = jch.JsonCheckpointHandler._save_fn
        async def json_save(self, x, directory):
            if TARGET in str(directory):
                die()
            return await real_json(self, x, directory)
        jch.JsonCheckpointHandler._save_fn = json_save
    elif mode == "commit":  # everything written, the commit marker not yet
        real_write = async_path.write_text
        async def write_text(path, text, *a, **k):
            if os.path.basename(os.path.dirname(str(path))) == STEP_TMP and str(path).endswith("commit_success.txt"):
                die()
            return await real_write(path, text, *a, **k)
        async_path.write_text = write_text
    elif mode in ("rename", "after_rename"):  # before / just after the step's directory is renamed
        real_rename = async_path.rename
        async def rename(src, dst):
            step_dir = os.path.basename(str(src)) == STEP_TMP  # not the renames of its items inside it
            if step_dir and mode == "rename":
                die()
            out = await real_rename(src, dst)
            if step_dir:
                die()
            return out
        async_path.rename = rename
    toy.engine(workdir).run(toy.fit_pass())
    print("child finished without being killed", flush=True)
''')


def _child(mode, workdir):
    env = runner.env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), env["PYTHONPATH"]])
    return subprocess.run([sys.executable, "-c", _CHILD, mode, str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return toy.result_arrays(toy.engine(tmp_path_factory.mktemp("whole")).run(toy.fit_pass()))


def _assert_identical(state, want):
    for k, v in toy.result_arrays(state).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


@pytest.mark.slow  # a child process (JAX import, compilation) per case: the whole tier
@pytest.mark.parametrize("mode,resumes_at", [("meta", 2), ("commit", 2), ("rename", 2), ("after_rename", 4)])
def test_killed_inside_a_checkpoint_write_resumes_to_identical_results(tmp_path, whole, mode, resumes_at):
    proc = _child(mode, tmp_path)
    assert proc.returncode == -9, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    ckpts = tmp_path / "checkpoints" / "fit"
    # Before the rename the new checkpoint exists only under a temporary name, never as step 4.
    assert sorted(os.listdir(ckpts)) != [] and ("4" in os.listdir(ckpts)) == (mode == "after_rename")
    log = []
    state = toy.engine(tmp_path, log=log.append).run(toy.fit_pass())
    assert f"[resume] pass 'fit': {resumes_at}/{toy.TOTAL} batches already done" in log, log
    _assert_identical(state, whole)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_disk_that_refuses_the_write_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, whole, monkeypatch,
                                                                                  err):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    real = jch.JsonCheckpointHandler._save_fn
    calls = []

    async def refusing(self, x, directory):
        calls.append(directory)
        if len(calls) == 2:  # the checkpoint after batch 4
            raise OSError(err, os.strerror(err), str(directory))
        return await real(self, x, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", refusing)
    kept = r"previous checkpoint \(2\) is kept"
    with pytest.raises(extract.CheckpointWriteError,
                       match=rf"checkpoint 4 into .*checkpoints/fit.*{os.strerror(err)}.*{kept}"):
        toy.engine(tmp_path).run(toy.fit_pass())
    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", real)
    log = []
    state = toy.engine(tmp_path, log=log.append).run(toy.fit_pass())
    assert f"[resume] pass 'fit': 2/{toy.TOTAL} batches already done" in log, log
    _assert_identical(state, whole)


def _permissions_enforced(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    os.chmod(probe, 0o555)
    try:
        (probe / "x").write_text("x")
        return False  # root with CAP_DAC_OVERRIDE writes anyway
    except PermissionError:
        return True
    finally:
        os.chmod(probe, 0o755)


def test_a_read_only_checkpoint_directory(tmp_path, whole):
    if not _permissions_enforced(tmp_path):
        pytest.skip("this process ignores directory permissions (root); the injected EROFS above covers it")
    _interrupted(tmp_path)  # checkpoints after batches 2 and 4
    ckpts = tmp_path / "checkpoints" / "fit"
    os.chmod(ckpts, 0o555)
    try:
        with pytest.raises(extract.CheckpointWriteError,
                           match=r"checkpoint 6 into .*previous checkpoint \(4\) is kept"):
            toy.engine(tmp_path).run(toy.fit_pass())
    finally:
        os.chmod(ckpts, 0o755)
    state = toy.engine(tmp_path).run(toy.fit_pass())
    _assert_identical(state, whole)


class _Stop(Exception):
    pass


class _StopAt:
    """Reads fail from sample `after` on: the run dies mid-pass, leaving its checkpoints."""

    def __init__(self, src, after):
        self.src, self.after = src, after

    def __len__(self):
        return len(self.src)

    def get_batch(self, idx):
        if np.max(idx) >= self.after:
            raise _Stop()
        return self.src.get_batch(idx)

    @property
    def image_shape(self):
        return self.src.image_shape


def _interrupted(workdir, ms=None):
    with pytest.raises(_Stop):  # dies reading batch 6: checkpoints after batches 2 and 4 exist
        toy.engine(workdir, ms).run(toy.fit_pass(_StopAt(toy.source(), after=40)))
    return workdir / "checkpoints" / "fit"


@pytest.mark.parametrize("damage", ["missing_file", "truncated_file", "other_state"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, whole, damage):
    ckpts = _interrupted(tmp_path)
    assert sorted(os.listdir(ckpts)) == ["2", "4"]
    state_files = sorted(p for p in (ckpts / "4" / "state").rglob("*") if p.is_file() and "/d/" in str(p))
    if damage == "missing_file":
        for p in state_files:
            p.unlink()
    elif damage == "truncated_file":
        for p in state_files:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:  # valid orbax files holding another state (a botched copy): only the recorded hash tells
        shutil.rmtree(ckpts / "4" / "state")
        shutil.copytree(ckpts / "2" / "state", ckpts / "4" / "state")
    log = []
    state = toy.engine(tmp_path, log=log.append).run(toy.fit_pass())
    warnings = [line for line in log if line.startswith("[warning]") and "checkpoint 4" in line]
    assert warnings and "falling back to the previous checkpoint" in warnings[0], log
    if damage == "other_state":
        assert "SHA-256" in warnings[0]
    assert f"[resume] pass 'fit': 2/{toy.TOTAL} batches already done" in log, log
    _assert_identical(state, whole)


def test_a_damaged_finished_pass_is_run_again(tmp_path, whole):
    toy.engine(tmp_path).run(toy.fit_pass())
    done = tmp_path / "passes" / "fit" / str(toy.TOTAL) / "state"
    for p in (p for p in done.rglob("*") if p.is_file() and "/d/" in str(p)):
        p.unlink()
    log = []
    state = toy.engine(tmp_path, log=log.append).run(toy.fit_pass())
    assert any(line.startswith("[warning]") and "running pass 'fit' again" in line for line in log), log
    _assert_identical(state, whole)


def test_changed_weights_under_the_same_config_never_resume(tmp_path):
    _interrupted(tmp_path)
    nudged = toy.members(scale_b=np.nextafter(np.float32(0.5), np.float32(1)))  # one ulp, same "file"
    with pytest.raises(RuntimeError, match="different config"):
        toy.engine(tmp_path, nudged).run(toy.fit_pass())
    log = []  # the unchanged weights still resume (the check is not simply refusing everything)
    toy.engine(tmp_path, log=log.append).run(toy.fit_pass())
    assert f"[resume] pass 'fit': 4/{toy.TOTAL} batches already done" in log, log
