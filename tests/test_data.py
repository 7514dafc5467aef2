"""The Grain loader: packing contract, loss masks, mixture, per-process shares, exact resume, bad shards."""

import itertools

import numpy as np
import pytest

from configs import tiny
from phi1_jax.data_gen.shards import Document, write_shards
from phi1_jax import data
from phi1_jax.tokenizer import TokenizerError


def _docs(n, tag):
    # Distinct documents of varied lengths (some longer than a window), each with an exercise-style prompt.
    out = []
    for i in range(n):
        prompt = f"def {tag}_{i}(x):\n    \"\"\"{tag} number {i}.\"\"\"\n"
        out.append(Document(prompt + f"    y = x * {i}\n" * (1 + (7 * i) % 13) + "    return y\n", prompt))
    return out


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("shards")
    dirs = {}
    for tag, n in (("code", 40), ("books", 30), ("ex", 25)):
        write_shards(_docs(n, tag), tok, root / tag, source_name=tag, input_desc=tag, docs_per_shard=7, progress=False)
        dirs[tag] = str(root / tag)
    return dirs


def _dataset(shard_sets, tok, names=("code",), weights=None, seq_len=32, batch=4, seed=0, loss_on="all", **kw):
    weights = weights or [1.0] * len(names)
    sources = [data.Source(n, shard_sets[n], w, loss_on) for n, w in zip(names, weights)]
    return data.make_dataset(sources, seq_len=seq_len, batch_size=batch, eos_id=tok.eos_id, seed=seed,
                             tokenizer_fingerprint=tok.fingerprint, **kw)


def _epoch_stream(shard_sets, tok, name):
    """Tokens of one epoch in the loader's shuffled order, each document followed by EOS."""
    n = len(_docs(40 if name == "code" else 30 if name == "books" else 25, name))
    docs = data.document_dataset(data.Source(name, shard_sets[name], 1.0), eos_id=tok.eos_id, seed=0)
    return np.concatenate([docs[i]["tokens"] for i in range(n)])


def test_packing_contract(shard_sets, tok):
    seq = 32
    batches = list(itertools.islice(iter(_dataset(shard_sets, tok, seq_len=seq, batch=1)), 60))
    windows = []
    for b in batches:
        inp, tgt, seg, pos, mask = (b[k][0] for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask"))
        assert inp.dtype == tgt.dtype == seg.dtype == pos.dtype == np.int32 and mask.dtype == np.float32
        assert seg[0] == 1 and (np.diff(seg) >= 0).all() and (seg >= 1).all()  # no padding in an infinite stream
        np.testing.assert_array_equal(inp[1:], tgt[:-1])  # targets are the inputs shifted by one
        for t in range(1, seq):
            if seg[t] != seg[t - 1]:
                assert pos[t] == 0  # positions restart at each document
                assert inp[t - 1] == tok.eos_id  # a document ends with EOS before the next begins
            else:
                assert pos[t] == pos[t - 1] + 1
        # the only unlearned targets are the ones that would cross into the next document (EOS -> its first token)
        crossing = np.append(seg[1:] != seg[:-1], False)
        np.testing.assert_array_equal(mask == 0, crossing)
        assert not (mask.astype(bool) & (inp == tok.eos_id) & crossing).any()
        windows.append(np.append(inp, tgt[-1]))
    # concatenate-then-split: the windows, laid end to end, are exactly the shuffled documents joined by EOS
    stream = _epoch_stream(shard_sets, tok, "code")
    got = np.concatenate(windows)[: len(stream)]
    np.testing.assert_array_equal(got, stream[: len(got)])


def test_loss_only_on_solutions(shard_sets, tok):
    b = next(iter(_dataset(shard_sets, tok, names=("ex",), loss_on="solution", seq_len=256, batch=2)))
    for row in range(2):
        inp, tgt, seg, mask = (b[k][row] for k in ("inputs", "targets", "segment_ids", "loss_mask"))
        text_of_learned = tok.decode(tgt[mask > 0])
        assert '"""' not in text_of_learned and "def ex_" not in text_of_learned  # no prompt token is a target
        assert "return y" in text_of_learned and (tgt[mask > 0] == tok.eos_id).any()  # solutions and EOS are


def test_mixture_proportions_over_10k_sequences(shard_sets, tok):
    weights = {"code": 0.5, "books": 0.3, "ex": 0.2}
    ds = _dataset(shard_sets, tok, names=tuple(weights), weights=list(weights.values()), seq_len=8, batch=100)
    ids = np.concatenate([b["source_id"] for b in itertools.islice(iter(ds), 100)])
    assert len(ids) == 10_000
    for i, w in enumerate(weights.values()):
        assert abs(np.mean(ids == i) - w) < 0.02, (i, np.mean(ids == i), w)


def test_two_processes_read_disjoint_shares_that_cover_the_epoch(shard_sets, tok):
    src = data.Source("code", shard_sets["code"], 1.0)
    shares = []
    for p in range(2):
        docs = data.document_dataset(src, eos_id=tok.eos_id, seed=3, process_index=p, process_count=2, epochs=1)
        shares.append({tuple(docs[i]["tokens"]) for i in range(len(docs))})
    everything = data.document_dataset(src, eos_id=tok.eos_id, seed=3, epochs=1)
    assert len(everything) == 40 and len(shares[0]) == len(shares[1]) == 20
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == {tuple(everything[i]["tokens"]) for i in range(40)}
    # through the whole pipeline too: each process gets half the global batch, and different windows
    a, b = (next(iter(_dataset(shard_sets, tok, batch=8, process_index=p, process_count=2))) for p in range(2))
    assert a["inputs"].shape == (4, 32) and not np.array_equal(a["inputs"], b["inputs"])
    with pytest.raises(data.DataError, match="batch_size 5 does not divide among 2 processes"):
        _dataset(shard_sets, tok, batch=5, process_count=2)


def test_restored_iterator_reproduces_the_next_50_batches(shard_sets, tok):
    ds = _dataset(shard_sets, tok, names=("code", "books", "ex"), weights=[0.5, 0.3, 0.2], seq_len=24, batch=3)
    it = iter(ds)
    for _ in range(17):  # mid-epoch, with a document split across windows in flight
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(50)]
    fresh = iter(_dataset(shard_sets, tok, names=("code", "books", "ex"), weights=[0.5, 0.3, 0.2], seq_len=24, batch=3))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_epochs_are_reshuffled(shard_sets, tok):
    docs = data.document_dataset(data.Source("code", shard_sets["code"], 1.0), eos_id=tok.eos_id, seed=0)
    first = [tuple(docs[i]["tokens"]) for i in range(40)]
    second = [tuple(docs[i]["tokens"]) for i in range(40, 80)]
    assert set(first) == set(second) and first != second


# --- bad input ---------------------------------------------------------------------------------------------------------


def test_truncated_shard_is_refused_by_name(shard_sets, tok, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shard_sets["code"], broken)
    shard = broken / "shard-00001.arrayrecord"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(data.DataError, match="source 'code'.*broken"):
        list(itertools.islice(iter(data.make_dataset([data.Source("code", str(broken), 1.0)], seq_len=16, batch_size=2,
                                                      eos_id=tok.eos_id, seed=0)), 200))
    (broken / "shard-00002.arrayrecord").unlink()
    with pytest.raises(data.DataError, match="shard-00002.arrayrecord: listed in .*manifest.json but missing"):
        _dataset({"code": str(broken)}, tok)


def test_config_errors_name_the_field_or_file(shard_sets, tok, tmp_path):
    with pytest.raises(data.DataError, match="source 'code': .*missing: shard directory not found"):
        _dataset({"code": str(tmp_path / "missing")}, tok)
    with pytest.raises(data.DataError, match=r"config.data.sources.code.path"):
        data.Source("code", "", 1.0)
    with pytest.raises(data.DataError, match="loss_on"):
        data.Source("code", "x", 1.0, loss_on="prompt")
    with pytest.raises(data.DataError, match="manifest.json: shards were tokenized with another tokenizer"):
        data.make_dataset([data.Source("code", shard_sets["code"], 1.0)], seq_len=8, batch_size=1, eos_id=1, seed=0,
                          tokenizer_fingerprint="0123456789abcdef")
    c = tiny.get_config()
    c.model.vocab_size = 1000
    with pytest.raises(TokenizerError, match="vocab_size 2048 does not fit the model's vocab_size 1000"):
        data.from_config(c, process_index=0, process_count=1)


def test_tiny_config_trains_on_the_embedded_corpus(embedded):
    c = tiny.get_config()
    ds, tokenizer = data.from_config(c, process_index=0, process_count=1)
    b = next(iter(ds))
    assert b["inputs"].shape == (c.batch_size, c.seq_len)
    assert tokenizer.fingerprint == embedded.tokenizer().fingerprint
    assert b["inputs"].max() < c.model.vocab_size


def test_embedded_corpus_mixes_with_the_sources_that_name_a_path(embedded, shard_sets):
    """configs/tiny_fig2_1.py's second regime: the stdlib corpus plus shards made with its tokenizer, by weight; a
    source without a path (configs/phi1.py's defaults) is not in use with the embedded corpus."""
    import ml_collections

    c = tiny.get_config()
    c.data.embedded_weight = 1.0
    with c.unlocked():
        c.data.sources = ml_collections.ConfigDict(dict(ex=dict(path=shard_sets["ex"], weight=1.0, loss_on="all"),
                                                        unused=dict(path="", weight=1.0, loss_on="all")))
    ds, _ = data.from_config(c, process_index=0, process_count=1)
    ids = np.concatenate([b["source_id"] for b in itertools.islice(iter(ds), 50)])
    assert set(np.unique(ids)) == {0, 1}  # stdlib and ex; "unused" never appears
    assert 0.35 < (ids == 1).mean() < 0.65  # equal weights
