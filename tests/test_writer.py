"""datasets.writer.StreamingBuilder and the local-file formats: bounded memory, no TensorFlow, same data."""

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxformer_lite.data import datasets
from flaxformer_lite.data.datasets import text_files, writer


class _Pairs:
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        text = tfds.features.Text()
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"a": text, "b": text}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(300), "test": self._generate_examples(7)}

    def _generate_examples(self, n):
        for i in range(n):
            yield f"key{i}", {"a": f"text {i} " * (1 + i % 5), "b": str(i * i)}


class StreamedPairs(_Pairs, writer.StreamingBuilder, skip_registration=True):
    pass


class TfdsPairs(_Pairs, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    pass


def _records(builder, split):
    source = builder.as_data_source(split=split)
    return [(x["a"], x["b"]) for x in source.__getitems__(list(range(len(source))))]


def test_a_small_split_is_written_as_tfds_writes_it(tmp_path):
    ours, theirs = StreamedPairs(data_dir=str(tmp_path / "a")), TfdsPairs(data_dir=str(tmp_path / "b"))
    for b in (ours, theirs):
        b.download_and_prepare(file_format="array_record")
    for split in ("train", "test"):
        assert _records(ours, split) == _records(theirs, split)  # same records, same (hashed) order
    assert ours.info.splits["train"].num_examples == 300


def test_a_split_past_the_buffer_streams_in_file_order_over_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "BUFFER_BYTES", 500)  # forces the streaming path after a few examples
    monkeypatch.setattr(writer, "SHARD_BYTES", 4000)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"source sentence {i}\tZielsatz {i}" for i in range(400)]
    lines[10] = "only one field"  # skipped and counted, as before
    (corpus / "train.tsv").write_text("\n".join(lines) + "\n")
    source = datasets.open_source("tsv_translate", "train", str(tmp_path / "tfds"), manual_dir=str(corpus))
    got = [(x["source"].decode(), x["target"].decode()) for x in source]
    want = [tuple(line.split("\t")) for i, line in enumerate(lines) if i != 10]
    assert got == want  # every usable line, in the order of the file
    assert len(source.paths) > 3  # several shards
    assert "tensorflow" not in sys.modules


def test_an_interrupted_preparation_leaves_nothing_prepared(tmp_path):
    class Broken(StreamedPairs, skip_registration=True):
        def _generate_examples(self, n):
            yield from super()._generate_examples(5)
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        Broken(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    assert not Broken(data_dir=str(tmp_path)).is_prepared()
    fresh = StreamedPairs(data_dir=str(tmp_path))
    fresh.download_and_prepare(file_format="array_record")
    assert len(_records(fresh, "test")) == 7


def _write_columnar(folder, kind, rows):
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    if kind == "jsonl":
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, folder / "train.parquet", row_group_size=7)
    else:  # a HuggingFace save_to_disk folder: Arrow stream files
        (folder / "train").mkdir()
        for part, chunk in enumerate((table.slice(0, 20), table.slice(20))):
            with pa.OSFile(str(folder / "train" / f"data-0000{part}-of-00002.arrow"), "wb") as sink:
                with pa.ipc.new_stream(sink, chunk.schema) as w:
                    w.write_table(chunk)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow"])
def test_columnar_corpora_with_nested_fields(tmp_path, kind):
    rows = [{"id": i, "translation": {"en": f"hello {i}", "de": f"hallo {i}"}} for i in range(50)]
    rows[3]["translation"]["de"] = ""  # empty: skipped
    rows[4]["translation"]["en"] = None  # missing: skipped
    corpus = tmp_path / "c"
    corpus.mkdir()
    _write_columnar(corpus, kind, rows)
    source = datasets.open_source(
        "tsv_translate", "train", str(tmp_path / "tfds"), manual_dir=str(corpus),
        fields="translation.en,translation.de",
    )  # fmt: skip
    got = [(x["source"].decode(), x["target"].decode()) for x in source]
    assert sorted(got) == sorted((f"hello {i}", f"hallo {i}") for i in range(50) if i not in (3, 4))


def test_a_missing_column_names_the_columns_there(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    _write_columnar(corpus, "jsonl", [{"en": "a", "de": "b"}])
    with pytest.raises(text_files.BadCorpusError, match=r"no column 'source'.*\['en', 'de'\]"):
        datasets.open_source("tsv_translate", "train", str(tmp_path / "tfds"), manual_dir=str(corpus))


def test_streamed_lines_count_skips(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"a\tb\n\xff\xfe\tx\n\tb\nc\td\te\n" + b"x" * 30_000 + b"\ty\nf\tg\n")
    rows, skipped = text_files.read_lines(str(path), 2)
    assert rows == [("a", "b"), ("f", "g")]
    assert sum(skipped.values()) == 4 and skipped["not UTF-8"] == 1 and skipped["empty field"] == 1
    assert np.sum(list(skipped.values())) == 4


def test_split_slices_read_the_records_they_name_over_shards(tmp_path, monkeypatch):
    """A TFDS slice ("train[a:b]", percentages, negative ends) of a split spread over several shards
    reads exactly those lines of the file, through TFDS decoding and through the raw `texts` read."""
    monkeypatch.setattr(writer, "BUFFER_BYTES", 500)
    monkeypatch.setattr(writer, "SHARD_BYTES", 1500)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    want = [(f"source sentence {i}", f"Zielsatz {i}") for i in range(300)]
    (corpus / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in want))
    data_dir, shards = str(tmp_path / "tfds"), None
    slices = {"train": want, "train[:1]": want[:1], "train[:100]": want[:100], "train[37:211]": want[37:211],
              "train[-5:]": want[-5:], "train[10%:20%]": want[30:60], "train[299:]": want[299:]}  # fmt: skip
    for start in range(0, 260, 13):  # every shard boundary region, a slice of 41 from each start
        slices[f"train[{start}:{start + 41}]"] = want[start : start + 41]
    for split, expected in slices.items():
        source = datasets.open_source("tsv_translate", split, data_dir, manual_dir=str(corpus))
        shards = shards or len(source.paths)
        assert [(x["source"].decode(), x["target"].decode()) for x in source] == expected, split
        assert source.texts(0, len(source), ["source", "target"]) == expected, split
    assert shards > 4
    with pytest.raises(ValueError, match=r"bad split 'train\[:x\]'.*train\[:1000\]"):
        datasets.open_source("tsv_translate", "train[:x]", data_dir, manual_dir=str(corpus))
    with pytest.raises(ValueError, match="has no split 'dev"):
        datasets.open_source("tsv_translate", "dev[:10]", data_dir, manual_dir=str(corpus))
