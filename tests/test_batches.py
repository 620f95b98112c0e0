"""Token windows drawn from prepared shards, checked against the shard files read directly."""

import numpy as np

from llmkit.data.shards import PrepareConfig, prepare_data
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.train.batches import TokenBatches


def test_windows_are_slices_of_the_shards_and_depend_only_on_the_index(tmp_path):
    text = "".join(chr(ord("a") + (i * 7 + i // 26) % 26) for i in range(3000))
    (tmp_path / "corpus.txt").write_text(text)
    train_tokenizer(
        TokenizerConfig(
            source=str(tmp_path / "corpus.txt"),
            out=str(tmp_path / "tok"),
            kind="char",
            vocab_size=64,
            held_out_fraction=0,
        )
    )
    prepare_data(
        PrepareConfig(
            source=str(tmp_path / "corpus.txt"),
            tokenizer=str(tmp_path / "tok"),
            out=str(tmp_path / "data"),
            val_fraction=0.2,
            split="tail",
            workers=1,
        )
    )
    stream = {
        split: np.fromfile(tmp_path / "data" / f"{split}_000.bin", dtype="<u2").astype(np.int64)
        for split in ("train", "val")
    }

    train = TokenBatches(str(tmp_path / "data"), "train", batch_size=5, context_length=16, seed=3)
    batch = train.get_batch(7)
    for inputs, targets in zip(batch["input_ids"].numpy(), batch["targets"].numpy()):
        starts = [s for s in range(len(stream["train"]) - 16) if (stream["train"][s : s + 16] == inputs).all()]
        assert starts and (stream["train"][starts[0] + 1 : starts[0] + 17] == targets).all()
    again = TokenBatches(str(tmp_path / "data"), "train", batch_size=5, context_length=16, seed=3).get_batch(7)
    assert all(again[key].equal(batch[key]) for key in batch)
    assert not train.get_batch(8)["input_ids"].equal(batch["input_ids"])

    val = TokenBatches(str(tmp_path / "data"), "val", batch_size=4, context_length=16)
    windows = (len(stream["val"]) - 17) // 16
    for index in (0, 5):
        for row, inputs in enumerate(val.sequential_batch(index)["input_ids"].numpy()):
            start = ((index * 4 + row) % windows) * 16
            assert (inputs == stream["val"][start : start + 16]).all()
    assert val.bytes_per_token == 600 / 601  # 600 characters + one end-of-text token
