"""Damaged files, read-only workdirs and full disks, as the real scripts meet them.

A truncated or garbled prepared dataset, spm.model or transformers directory is one line on stderr
naming the file and the fix, exit 1, and following that fix gives what a healthy run gives. Readers
(eval.py, generate.py) of a workdir whose newest checkpoint is corrupt read the previous one and move
nothing; eval.py on a full disk keeps its previous outputs whole.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests import runs
from tests.runs import STEPS, TIMEOUT

pytestmark = pytest.mark.slow

LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl log records (warnings included) are not the error line


# A command prefix with a file-size limit: the kernel refuses writes past it (EFBIG), as a full disk does.
FULL_DISK = """
import os, resource, sys
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
os.execv(sys.argv[2], sys.argv[2:])
"""


def _script(script, *args, stdin=b"", prefix=(), limit_file_bytes=None):
    """Run `script` as a user would (`prefix`: a command it runs under; a file-size limit: a full disk)."""
    if limit_file_bytes is not None:
        prefix = [*prefix, sys.executable, "-c", FULL_DISK, str(limit_file_bytes)]
    return subprocess.run(
        [*prefix, sys.executable, script, *args], cwd=runs.ROOT, env=runs.environment(), input=stdin,
        capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip


def _error_line(returncode: int, err: str) -> str:
    """The one line a failed script printed (absl log records and progress bars aside)."""
    assert returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ours = [x for x in err.splitlines() if x.strip() and not LOG_LINE.match(x) and not x.startswith("train:")]
    assert len(ours) == 1 and ours[0].startswith("error: "), ours
    return ours[0]


def _failed(proc) -> str:
    return _error_line(proc.returncode, proc.stderr.decode(errors="replace"))


def _snapshot(folder) -> dict:
    """{relative path: (size, mtime)} of every file and folder under `folder`."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size if name in names else None, st.st_mtime_ns)
    return out


def _outputs(folder) -> dict:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def _eval_flags(workdir, data_dir, out_dir, *extra):
    return [
        "--config=tests/tiny_config.py", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
        "--beam_size=1", "--max_examples=4", f"--output_dir={out_dir}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def healthy_eval(prepared, reference, tmp_path_factory):
    """eval.py's outputs for the reference run on the intact prepared data."""
    out = tmp_path_factory.mktemp("healthy_eval")
    proc = _script("eval.py", *_eval_flags(reference, prepared[0], out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {f: data for f, data in _outputs(out).items() if not f.endswith(".json")}  # json names the dir


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # garbled: 64 bytes flipped, the length kept (in the test split: its second record)
        data[1024:1088] = bytes(b ^ 0xFF for b in data[1024:1088])
    os.remove(path)  # a new file: the session's shared files may be hard links to it
    with open(path, "wb") as f:
        f.write(data)


def _prepared_file(data_dir, suffix):
    """The fixture's bible_translate file (other tests may prepare their corpora in the same data dir)."""
    (path,) = [
        os.path.join(root, f)
        for root, _, names in os.walk(data_dir)
        for f in names
        if suffix in f and f"{os.sep}bible_translate{os.sep}" in os.path.join(root, "")
    ]
    return path


@pytest.mark.parametrize(
    "damaged, how",
    [
        ("-test.array_record", "truncated"),
        ("-test.array_record", "garbled"),
        ("dataset_info.json", "truncated"),
    ],
)
def test_a_damaged_prepared_dataset_is_one_line_and_its_fix_restores_the_outputs(
    damaged, how, prepared, reference, healthy_eval, tmp_path
):
    data_dir = str(tmp_path / "tfds")
    shutil.copytree(prepared[0], data_dir)
    path = _prepared_file(data_dir, damaged)
    _damage(path, how)
    flags = _eval_flags(reference, data_dir, tmp_path / "out")
    line = _failed(_script("eval.py", *flags))
    if damaged == "dataset_info.json":  # TFDS cannot open the dataset at all: the line names its folder
        named = folder = os.path.dirname(os.path.dirname(path))
    else:
        named, folder = path, os.path.dirname(path)
    assert line.startswith(f"error: cannot read {named} ("), line
    assert line.endswith(f"delete {folder} and rerun, which prepares it again"), line
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
    shutil.rmtree(folder)  # the fix it names
    proc = _script("eval.py", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = _outputs(tmp_path / "out")
    assert {f: outputs[f] for f in healthy_eval} == healthy_eval


def test_train_on_a_truncated_train_split_stops_before_training_with_one_line(prepared, tmp_path):
    data_dir = str(tmp_path / "tfds")
    shutil.copytree(prepared[0], data_dir)
    split_file = _prepared_file(data_dir, "-train.array_record")
    _damage(split_file, "truncated")
    workdir = str(tmp_path / "work")
    proc = runs.start(workdir, (data_dir, prepared[1]))
    err = runs.finish(proc, expect_ok=False)
    line = _error_line(proc.returncode, err)
    assert line.startswith(f"error: cannot read {split_file} ("), line
    assert line.endswith(f"delete {os.path.dirname(split_file)} and rerun, which prepares it again"), line
    checkpoints = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(checkpoints) or not [d for d in os.listdir(checkpoints) if d.isdigit()]


def test_a_truncated_spm_model_is_one_line_and_its_fix_trains_the_same_tokenizer(
    prepared, reference, healthy_eval, tmp_path
):
    workdir = str(tmp_path / "work")
    shutil.copytree(reference, workdir)
    spm_model = os.path.join(workdir, "spm.model")
    _damage(spm_model, "truncated")
    checkpoints = _snapshot(os.path.join(workdir, "checkpoints"))
    flags = _eval_flags(workdir, prepared[0], tmp_path / "out")
    line = _failed(_script("eval.py", *flags))
    assert line.startswith(f"error: cannot read {spm_model} (RuntimeError: ") and "ModelProto" in line, line
    assert "delete it and rerun train.py with this workdir's config" in line, line
    os.remove(spm_model)  # the fix it names
    runs.run(workdir, prepared)
    assert open(spm_model, "rb").read() == open(prepared[1], "rb").read()  # the same tokenizer
    assert _snapshot(os.path.join(workdir, "checkpoints")) == checkpoints  # no step trained again
    proc = _script("eval.py", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = _outputs(tmp_path / "out")
    assert {f: outputs[f] for f in healthy_eval} == healthy_eval


# --------------------------------------------------------------------- a transformers directory


@pytest.fixture(scope="module")
def hf_dir(prepared, tmp_path_factory):
    """A tiny GPT-2 saved as transformers does (config.json, model.safetensors) with tokenizer.model."""
    pytest.importorskip("safetensors")
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    import flaxformer_lite as fl
    from flaxformer_lite import interop

    path = tmp_path_factory.mktemp("hf") / "gpt2"
    cfg = fl.gpt2_small(vocab_size=400, d_model=32, num_heads=4, d_ff=64, num_decoder_layers=1, max_len=64)
    params = fl.DecoderOnly(cfg).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    interop.to_hf(nn.unbox(params), cfg, str(path))
    shutil.copy(prepared[1], path / "tokenizer.model")
    return path


def _set(key, value):
    def edit(path):
        config = json.load(open(path / "config.json"))
        config[key] = value
        (path / "config.json").write_text(json.dumps(config))

    return edit


def _cut(name, keep):
    def edit(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep])

    return edit


HF_CASES = {  # name: (damage, the damaged file, what the line says besides its name)
    "a number written as a string": (
        _set("n_embd", "32"),
        "config.json",
        r"has a value .*n_embd='32'.*TypeError: '>' not supported",
    ),
    "a truncated config.json": (_cut("config.json", 60), "config.json", r"cannot read .*JSONDecodeError"),
    "a vocab_size of 10**12": (  # was an OverflowError traceback
        _set("vocab_size", 10**12),
        "config.json",
        r"has vocab_size=1000000000000, which is not a whole number from 1 to 4,194,304",
    ),
    "10**6 layers": (  # traced for hours, memory climbing
        _set("n_layer", 10**6),
        "config.json",
        r"has n_layer=1000000, which is not a whole number from 1 to 1,024",
    ),
    "a truncated model.safetensors": (
        _cut("model.safetensors", 20),
        "model.safetensors",
        r"cannot read .*SafetensorError",
    ),
    "a truncated tokenizer.model": (
        _cut("tokenizer.model", 5000),
        "tokenizer.model",
        r"cannot read .*could not parse ModelProto",
    ),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_a_damaged_transformers_directory_is_one_line_naming_the_file(case, hf_dir, tmp_path):
    damage, name, expected = HF_CASES[case]
    path = tmp_path / "hf"
    shutil.copytree(hf_dir, path)
    damage(path)
    before = _snapshot(path)
    line = _failed(_script("generate.py", f"--hf_dir={path}", "--max_new_tokens=2", stdin=b"In the\n"))
    assert str(path / name) in line and re.search(expected, line), line
    assert line.endswith(f"replace {name} with its original (download or copy it again)"), line
    assert _snapshot(path) == before


def test_generate_on_an_intact_transformers_directory_answers(hf_dir):
    proc = _script("generate.py", f"--hf_dir={hf_dir}", "--max_new_tokens=2", stdin=b"In the\nGod\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.decode().count("\n") == 2


# --------------------------------------------------------------------- readers, outputs, flags


@contextlib.contextmanager
def _read_only(folder):
    """A command prefix under which `folder` is read-only, as on a read-only mount.

    A normal user gets `chmod -R a-w`. Root ignores permissions, so it gets a private read-only bind
    mount (`unshare -m`, needs CAP_SYS_ADMIN); where that is refused too, the prefix is empty and the
    tests' snapshot of the folder (nothing renamed, nothing written) is the check that remains.
    """
    if os.geteuid() != 0:  # permissions hold
        subprocess.run(["chmod", "-R", "a-w", folder], check=True)
        try:
            yield []
        finally:
            subprocess.run(["chmod", "-R", "u+w", folder], check=True)
        return
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", mount, str(folder)]
    usable = False
    if shutil.which("unshare"):
        probe = subprocess.run([*prefix, "touch", os.path.join(folder, ".probe")], capture_output=True)
        usable = probe.returncode != 0 and b"Read-only file system" in probe.stderr
    yield prefix if usable else []


def test_readers_of_a_read_only_workdir_skip_a_corrupt_newest_checkpoint_and_move_nothing(
    prepared, reference, tmp_path
):
    """generate.py and eval.py read the previous checkpoint; eval's results equal that step's."""
    workdir = str(tmp_path / "work")
    shutil.copytree(reference, workdir)
    newest = os.path.join(workdir, "checkpoints", str(STEPS))
    for root, _, names in os.walk(os.path.join(newest, "params")):
        for name in names:
            _damage(os.path.join(root, name), "truncated")
    before = _snapshot(workdir)
    common = ["--config=tests/tiny_config.py", f"--workdir={workdir}", f"--config.data_dir={prepared[0]}"]
    with _read_only(workdir) as prefix:
        lines = b"In the beginning\n\nGod said\n"
        gen = _script("generate.py", *common, "--beam_size=1", stdin=lines, prefix=prefix)
        ev = _script("eval.py", *_eval_flags(workdir, prepared[0], tmp_path / "out"), prefix=prefix)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.decode().count("\n") == 3 and b"Traceback" not in gen.stderr
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert _snapshot(workdir) == before  # nothing renamed, nothing written
    # The same outputs as an evaluation of the previous step of the intact run.
    previous = STEPS - runs.EVERY
    flags = _eval_flags(reference, prepared[0], tmp_path / "previous", f"--checkpoint_step={previous}")
    proc = _script("eval.py", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _outputs(tmp_path / "out"), _outputs(tmp_path / "previous")
    assert got.keys() == want.keys()
    for name in want:
        if name.endswith(".json"):  # names its output folder
            got_json, want_json = json.loads(got[name]), json.loads(want[name])
            assert got_json["checkpoint_step"] == want_json["checkpoint_step"] == previous
            assert got_json["perplexity"] == want_json["perplexity"]
        else:
            assert got[name] == want[name], name


def test_eval_on_a_full_disk_names_the_file_and_keeps_the_previous_outputs(
    prepared, reference, healthy_eval, tmp_path
):
    os.makedirs(tmp_path / "out")
    for name, data in healthy_eval.items():  # the outputs of an earlier evaluation
        (tmp_path / "out" / name).write_bytes(data)
    flags = _eval_flags(reference, prepared[0], tmp_path / "out")
    line = _failed(_script("eval.py", *flags, limit_file_bytes=100))  # the outputs but hyp.txt are larger
    written = re.match(
        r"error: writing (\S+) failed \(\[Errno 27\] File too large\); no output was changed", line
    )
    assert written and os.path.dirname(written[1]) == str(tmp_path / "out"), line
    assert line.endswith("free space (or pick another --output_dir) and rerun"), line
    assert _outputs(tmp_path / "out") == healthy_eval  # no empty, half-written or temporary file


def _contents(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_average_on_a_full_disk_keeps_the_previous_average(prepared, reference, tmp_path):
    """Before issue 38 the previous average was deleted before the new one was written."""
    workdir = str(tmp_path / "work")
    shutil.copytree(reference, workdir)
    flags = ["--config=tests/tiny_config.py", f"--workdir={workdir}", f"--config.data_dir={prepared[0]}"]
    proc = _script("-m", "flaxformer_lite.tools.average", *flags, "--last=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    averaged = os.path.join(workdir, "averaged")
    before = _contents(averaged)
    assert f"{STEPS}/params/_METADATA" in before
    line = _failed(_script("-m", "flaxformer_lite.tools.average", *flags, "--last=3", limit_file_bytes=100))
    assert line.startswith(f"error: writing the average to {averaged!r} failed ("), line
    assert "File too large" in line and line.endswith(
        "the previous average is kept. Free space (or fix the directory) and rerun."
    ), line
    assert _contents(averaged) == before
    assert sorted(os.listdir(workdir)) == sorted([*os.listdir(reference), "averaged"])  # no averaged.new


def test_average_over_a_damaged_step_names_it_and_the_readable_ones(prepared, reference, tmp_path):
    """Before issue 38: "none of the checkpoints [16] ... is readable ... Train again in another
    --workdir", although the other steps were fine."""
    workdir = str(tmp_path / "work")
    shutil.copytree(reference, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    last3 = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())[-3:]
    for root, _, names in os.walk(os.path.join(checkpoints, str(last3[0]), "params")):
        for name in names:
            _damage(os.path.join(root, name), "truncated")
    flags = ["--config=tests/tiny_config.py", f"--workdir={workdir}", f"--config.data_dir={prepared[0]}"]
    proc = _script("-m", "flaxformer_lite.tools.average", *flags, "--last=3")
    line = _failed(proc)
    assert line.startswith(f"error: checkpoint step [{last3[0]}] in {checkpoints!r} is unreadable"), line
    assert f"steps {last3[1:]} read fine" in line and b"Train again" not in proc.stderr, line
    assert not os.path.exists(os.path.join(workdir, "averaged"))
