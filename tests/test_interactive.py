"""generate.py in-process on the reference run (issue 38 item 8): what it counts and refuses.

Forced prefixes longer than the decoder's room are counted on stderr as trimmed sources are; a
--plot_attention that names a folder is refused before anything is decoded; a map that fails to
draw loses no translation (every line is answered, then the failure is the error).
"""

import io
import os

import pytest

from flaxformer_lite.data import tokenizer
from flaxformer_lite.generation import formatting, interactive
from tests import tiny_config

pytestmark = pytest.mark.slow

LONG = " ".join(["und"] * 40)  # a forced target prefix of more pieces than max_decode_length
LINES = f"God said.\t\nJesus wept.\t{LONG}\nLight.\t\n"


def _run(reference, prepared, lines: str, **shown):
    config = tiny_config.get_config()
    config.data_dir = prepared[0]
    out, err = io.StringIO(), io.StringIO()
    shown = formatting.Shown(prefix=True, **shown)
    counts = interactive.run(
        config, reference, io.BytesIO(lines.encode()), out, err, beam_size=2, shown=shown
    )
    return counts, out.getvalue(), err.getvalue()


def test_a_forced_prefix_longer_than_the_decoder_allows_is_counted(reference, prepared):
    counts, out, err = _run(reference, prepared, LINES)
    room = tiny_config.get_config().max_decode_length - 1
    assert counts["prefixes_trimmed"] == 1 and len(out.splitlines()) == 3
    sp = tokenizer.load_sentencepiece(os.path.join(reference, "spm.model"))
    assert out.splitlines()[1] == sp.decode(sp.encode(LONG)[:room])  # as much of the prefix as fits
    assert f"1 forced prefixes trimmed to {room} tokens" in err


def test_plot_attention_naming_a_folder_is_refused_and_writes_nothing(reference, prepared, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    with pytest.raises(ValueError, match=rf"--plot_attention={folder} is a folder: name the PNG file"):
        _run(reference, prepared, LINES, plot_attention=str(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"] and not list(folder.iterdir())


def test_a_failed_attention_map_loses_no_translation(reference, prepared, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formatting, "plot_attention", full_disk)
    out = io.StringIO()
    config = tiny_config.get_config()
    config.data_dir = prepared[0]
    shown = formatting.Shown(prefix=True, plot_attention=str(tmp_path / "map.png"), plot_line=2)
    with pytest.raises(ValueError, match=r"attention map of line 2 to .* failed \(OSError: \[Errno 28\]"):
        interactive.run(
            config, reference, io.BytesIO(LINES.encode()), out, io.StringIO(), beam_size=2, shown=shown
        )
    _, want, _ = _run(reference, prepared, LINES)
    assert out.getvalue() == want and len(want.splitlines()) == 3  # every line, the plotted one too
