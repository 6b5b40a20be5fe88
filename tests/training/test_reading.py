"""Reading-model data (issue 16): split-disjoint entities, phrasings, filler and numbers; answers verbatim in their
documents; determinism; input checks; chunked datasets equal to internalize's chunks; the per-kind report."""

import re

import pytest

from d2l_fast.training import reading as R
from d2l_fast.training import reading_pools as P
from d2l_fast.training.generators import validate_record
from d2l_fast.training.reading_run import blind_floor, eval_layout, qa_index, reading_report
from d2l_fast.training.reading_values import _common_words


def words(text):  # a cheap token counter: the generators accept any callable text → count
    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def mix():
    return {s: R.generate_reading(words, split=s, seed=5, n_facts=30, n_numbers=40, n_niah_per_bin=6,
                                  niah_bins=((32, 128), (128, 256)), n_long_per_bin=2, long_bins=((512, 800),),
                                  n_nohijack=6) for s in R.SPLITS}


UNANSWERED = ("general", "chitchat", "absent")


def test_records_are_valid_and_answers_are_verbatim(mix):
    for split, recs in mix.items():
        kinds = {r["meta"]["kind"] for r in recs}
        assert kinds == set(R.KINDS)
        assert len({r["id"] for r in recs}) == len(recs)
        for r in recs:
            validate_record(r, r["id"], need_answers=True)
            assert r["meta"]["split"] == split
            for qa in r["qas"]:
                assert qa["qa_kind"] in ("fact", "number", "needle", *UNANSWERED)
                if qa["qa_kind"] in UNANSWERED:
                    assert P.NOT_STATED not in r["context"]
                    continue
                assert qa["answers"][0] in r["context"], (r["id"], qa)
                if qa["qa_kind"] in ("number", "needle"):
                    assert qa["digits"] == sum(c.isdigit() for c in qa["answers"][0]) >= 1
            if "bin" in r["meta"]:
                lo, hi = r["meta"]["bin"]
                assert lo <= words(r["context"]) == r["meta"]["n_tokens"] < hi
                if r["task"] == "niah":  # the needle is the only digit run in a NIAH document
                    assert re.findall(r"\d+", r["context"]) == [r["qas"][0]["answers"][0]]


def test_numbers_cover_kinds_digits_and_several_per_document(mix):
    qas = [(r, qa) for r in mix["train"] for qa in r["qas"] if qa["qa_kind"] == "number"]
    assert {qa["number_kind"] for _, qa in qas} == {"integer", "year", "amount", "code"}
    assert {qa["digits"] for _, qa in qas if qa["number_kind"] == "integer"} >= set(range(1, 7))
    assert max(r["meta"]["n_numbers"] for r in mix["train"] if r["meta"]["kind"] == "numbers") >= 3
    assert any(re.search(r"[A-Z]", qa["answers"][0]) for _, qa in qas)  # codes with letters
    assert any("distractor" == qa["entity_role"] for _, qa in qas)


def test_number_questions_ask_about_the_stated_thing(mix):
    """A number attribute's phrasings name different things (a win, an inheritance); the question must use the
    phrasing of the sentence that states the number."""
    for split in ("train", "dev", "test"):
        for r in mix[split]:
            for qa in r["qas"]:
                if qa["qa_kind"] == "number":
                    a, _, pi = qa["fact_template"].split("/")
                    assert qa["question_template"] == f"{a}/{split}/{pi}", (split, qa)
                    stated = P.NUMBER_ATTRIBUTES[a]["preds"][split][int(pi)].format(value=qa["answers"][0])
                    assert stated in r["context"], (stated, r["context"][:300])


def _invented(recs):
    """The invented words of the records' entities and entity-valued answers (not the real words around them)."""
    common = _common_words()
    out = set()
    for r in recs:
        m = r["meta"]
        texts = [m.get("entity", ""), *m.get("distractors", [])]
        texts += [qa["answers"][0] for qa in r["qas"]
                  if qa["qa_kind"] == "fact"
                  and qa["attribute"] in ("birthplace", "home_city", "spouse", "employer", "school")]
        out.update(w for t in texts for w in t.split() if w.lower() not in common)
    return out


def test_splits_share_no_entities_numbers_templates_or_filler(mix):
    inv = {s: _invented(recs) for s, recs in mix.items()}
    nums = {s: {qa["answers"][0] for r in recs for qa in r["qas"]
                if qa["qa_kind"] in ("number", "needle") and qa["digits"] >= 2} for s, recs in mix.items()}
    for s in R.SPLITS:
        assert inv[s] and all(R.split_of(w) == s for w in inv[s])
        assert all(R.split_of(n) == s for n in nums[s])
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not inv[a] & inv[b] and not nums[a] & nums[b]
        for pool in (P.PERSON_ATTRIBUTES, P.NUMBER_ATTRIBUTES):
            for d in pool.values():
                for key in ("preds", "questions"):
                    assert not set(d[key][a]) & set(d[key][b])
        assert not {f[1] for f in P.FRAMES[a]} - {""} & {f[1] for f in P.FRAMES[b]}
        assert not {t for g in P.NEEDLES[a] for t in g[0] + g[1]} & {t for g in P.NEEDLES[b] for t in g[0] + g[1]}
        assert not {q for q, _ in P.GENERAL_QUESTIONS[a]} & {q for q, _ in P.GENERAL_QUESTIONS[b]}
        assert not set(P.CHITCHAT_QUESTIONS[a]) & set(P.CHITCHAT_QUESTIONS[b])
        fa, fb = R.filler_sources(a), R.filler_sources(b)
        assert not {n for n, _ in fa} & {n for n, _ in fb}
        assert not {s for _, ss in fa for s in ss} & {s for _, ss in fb for s in ss}
    for s in R.SPLITS:  # the records use only their split's phrasings
        for r in mix[s]:
            for qa in r["qas"]:
                if "question_template" in qa:
                    assert f"/{s}/" in qa["question_template"]
    sources = {s: {src for r in recs for src in r["meta"].get("sources", [])} for s, recs in mix.items()}
    assert all(len({x.split(":")[0] for x in sources[s]}) >= 1 for s in R.SPLITS)
    assert not sources["train"] & sources["test"]


def test_deterministic_by_seed():
    a = R.generate_fact_docs(5, split="dev", seed=3)
    assert a == R.generate_fact_docs(5, split="dev", seed=3)
    assert [r["context"] for r in a] != [r["context"] for r in R.generate_fact_docs(5, split="dev", seed=4)]
    n = R.generate_niah_docs(words, split="test", n_per_bin=3, seed=1)
    assert n == R.generate_niah_docs(words, split="test", n_per_bin=3, seed=1)
    assert n != R.generate_niah_docs(words, split="test", n_per_bin=3, seed=2)


def test_niah_training_extras_add_wordings_and_absent_questions():
    plain = R.generate_niah_docs(words, split="train", n_per_bin=6, seed=5)
    assert plain == R.generate_niah_docs(words, split="train", n_per_bin=6, seed=5, n_questions=1, absent_prob=0.0)
    rich = R.generate_niah_docs(words, split="train", n_per_bin=6, seed=5, n_questions=3, absent_prob=1.0)
    assert [r["context"] for r in rich[:1]] == [r["context"] for r in plain[:1]]  # same draws up to the extras
    for r in rich:
        gi = int(r["qas"][0]["attribute"][len("needle"):])
        needles = [qa for qa in r["qas"] if qa["qa_kind"] == "needle"]
        absent = [qa for qa in r["qas"] if qa["qa_kind"] == "absent"]
        assert len(needles) == min(3, len(P.NEEDLES["train"][gi][1]))
        assert len({qa["question"] for qa in needles}) == len(needles)
        assert all(qa["question"] in P.NEEDLES["train"][gi][1] and qa["answers"][0] in r["context"] for qa in needles)
        assert len(absent) == 1 and absent[0]["answers"] == [P.NOT_STATED]
        assert absent[0]["attribute"] != f"needle{gi}" and absent[0]["question"] not in P.NEEDLES["train"][gi][1]



def test_absent_needle_questions_never_ask_what_any_number_answers():
    """A question of a generic needle group ("Which number was hidden in this text?") is answered by whatever
    number a document holds, so it is never a document's unanswered question; a question about a numbered thing
    no needle names takes its place, and every other question and document stays as drawn."""
    for split in R.SPLITS:
        statements = [s for group in P.NEEDLES[split] for s in group[0]]
        for q in P.ABSENT_NEEDLE_QUESTIONS[split]:  # split-own wording that no needle answers
            assert q.endswith("?") and not any(q in other for s2 in R.SPLITS if s2 != split
                                               for other in P.ABSENT_NEEDLE_QUESTIONS[s2])
            assert not any(set(re.findall(r"[a-z]{5,}", q.lower())) & set(re.findall(r"[a-z]{5,}", s.lower()))
                           - {"number"} for s in statements), (split, q)
    generic = {q for g in P.GENERIC_NEEDLES["dev"] for q in P.NEEDLES["dev"][g][1]}
    assert generic  # the dev split has one ("Hidden somewhere in this text is the number {n}.")
    docs = R.generate_nohijack_docs(words, 40, split="dev", seed=1) + R.generate_niah_docs(
        words, split="dev", n_per_bin=20, seed=1, absent_prob=1.0)
    absent = [qa for r in docs for qa in r["qas"] if qa["qa_kind"] == "absent"]
    replaced = [qa for qa in absent if qa["attribute"] == "unnamed"]
    assert absent and not {qa["question"] for qa in absent} & generic and replaced
    assert {qa["question"] for qa in replaced} <= set(P.ABSENT_NEEDLE_QUESTIONS["dev"])
    assert all(qa["answers"] == [P.NOT_STATED] for qa in absent)
    # the rest of each document is what the generator drew before generic groups were skipped
    for r in docs:
        others = [qa for qa in r["qas"] if qa["qa_kind"] != "absent"]
        if r["meta"]["kind"] == "niah":
            assert others and all(qa["answers"][0] in r["context"] for qa in others)


def test_nohijack_with_base_answers():
    q = P.CHITCHAT_QUESTIONS["train"][0]
    recs = R.generate_nohijack_docs(words, 4, split="train", seed=0, base_answers={q: "I am fine, thanks."})
    kinds = [{qa["qa_kind"] for qa in r["qas"]} for r in recs]
    assert all(k == {"absent", "general", "chitchat"} for k in kinds)
    assert {r["meta"]["source_kind"] for r in recs} == {"facts", "niah"}
    assert all(qa["answers"] == [P.NOT_STATED] for r in recs for qa in r["qas"] if qa["qa_kind"] == "absent")


def test_nohijack_with_present_keeps_the_documents_and_adds_an_answered_question():
    q = P.CHITCHAT_QUESTIONS["train"][0]
    plain = R.generate_nohijack_docs(words, 6, split="train", seed=3, base_answers={q: "Fine."})
    rich = R.generate_nohijack_docs(words, 6, split="train", seed=3, base_answers={q: "Fine."}, with_present=True)
    assert [r["context"] for r in rich] == [r["context"] for r in plain]  # the same documents
    for r, p in zip(rich, plain):
        unanswered = [qa for qa in r["qas"] if qa["qa_kind"] in UNANSWERED]
        answered = [qa for qa in r["qas"] if qa["qa_kind"] not in UNANSWERED]
        assert [qa["qa_kind"] for qa in unanswered][:1] == ["absent"] and len(unanswered) == 3
        assert len(answered) == 1 and answered[0]["answers"][0] in r["context"]
        assert answered[0]["qa_kind"] == ("fact" if r["meta"]["source_kind"] == "facts" else "needle")
        if answered[0]["qa_kind"] == "fact":
            assert answered[0]["entity_role"] == "main"
        assert [qa for qa in p["qas"] if qa["qa_kind"] == "absent"] == unanswered[:1]
    # and the mix passes the switch through; off, nothing changes
    mix = R.generate_reading(words, split="train", seed=3, n_nohijack=4, nohijack_present=True)
    assert all(any(qa["qa_kind"] not in UNANSWERED for qa in r["qas"]) for r in mix)
    assert R.generate_reading(words, split="train", seed=3, n_nohijack=4) == R.generate_nohijack_docs(
        words, 4, split="train", seed=3)


def _kind(pool, attribute):
    return pool[attribute].get("value", pool[attribute].get("kind"))


@pytest.mark.parametrize("numbers", [False, True])
def test_hard_absent_asks_what_a_reader_that_does_not_bind_would_answer(numbers):
    gen = R.generate_number_docs if numbers else R.generate_fact_docs
    pool = P.NUMBER_ATTRIBUTES if numbers else P.PERSON_ATTRIBUTES
    assert gen(40, seed=2, absent_prob=1.0) == gen(40, seed=2, absent_prob=1.0, hard_absent=0.0)  # off: unchanged
    recs = gen(200, seed=2, absent_prob=1.0, hard_absent=1.0)
    n_hard = 0
    for r in recs:
        asked = [qa for qa in r["qas"] if qa["qa_kind"] in ("fact", "number")]
        main_attrs = {qa["attribute"] for qa in asked if qa["entity_role"] == "main"}
        for qa in r["qas"]:
            if qa["qa_kind"] != "absent":
                continue
            assert qa["answers"] == [P.NOT_STATED] and qa["attribute"] not in main_attrs
            if not qa.get("hard_negative"):
                continue
            n_hard += 1
            # a distractor's attribute (needs a distractor), the kind of a stated main attribute, or a person
            same_kind = _kind(pool, qa["attribute"]) in {_kind(pool, a) for a in main_attrs} | {"person"}
            assert same_kind or r["meta"]["distractors"], (qa, main_attrs, r["meta"])
    assert n_hard > 60  # most documents have a binding negative to ask
    easy = gen(200, seed=2, absent_prob=1.0)
    assert not any(qa.get("hard_negative") for r in easy for qa in r["qas"])


def test_hard_absent_reaches_the_mix_and_the_no_hijack_documents():
    mix = R.generate_reading(words, split="train", seed=4, n_facts=60, n_nohijack=20, fact_absent_prob=1.0,
                             hard_absent=1.0)
    absent = [qa for r in mix for qa in r["qas"] if qa["qa_kind"] == "absent"]
    facts_absent = [qa for r in mix if r["meta"]["kind"] == "facts" for qa in r["qas"] if qa["qa_kind"] == "absent"]
    assert len(facts_absent) == 60  # fact_absent_prob=1.0: one per fact document (default 0.25)
    assert sum(bool(qa.get("hard_negative")) for qa in absent) > len(absent) // 3
    nohijack = R.generate_nohijack_docs(words, 20, split="train", seed=4, hard_absent=1.0)
    assert any(qa.get("hard_negative") for r in nohijack for qa in r["qas"])
    assert R.generate_reading(words, split="train", seed=4, n_facts=10) == R.generate_reading(
        words, split="train", seed=4, n_facts=10, fact_absent_prob=None, hard_absent=0.0)


@pytest.mark.parametrize("call, match", [
    (lambda: R.generate_nohijack_docs(words, 2, with_present=1), "with_present"),
    (lambda: R.generate_fact_docs(2, hard_absent=2), "hard_absent"),
    (lambda: R.generate_number_docs(2, hard_absent=-1), "hard_absent"),
    (lambda: R.generate_fact_docs(2, split="validation"), "split must be one of"),
    (lambda: R.generate_fact_docs(0), "n_docs"),
    (lambda: R.generate_fact_docs(2, min_facts=5, max_facts=3), "min_facts"),
    (lambda: R.generate_fact_docs(2, absent_prob=1.5), "absent_prob"),
    (lambda: R.generate_number_docs(2, max_numbers=9), "max_numbers"),
    (lambda: R.generate_niah_docs(words, bins=[(64, 32)]), "bin"),
    (lambda: R.generate_niah_docs(words, digits=(0, 9)), "digits"),
    (lambda: R.generate_niah_docs(words, n_questions=0), "n_questions"),
    (lambda: R.generate_niah_docs(words, absent_prob=-0.1), "absent_prob"),
    (lambda: R.generate_niah_docs(words, bins=[(300, 302)]), "widen the bin"),
    (lambda: R.generate_nohijack_docs(words, 2, base_answers={"q": ""}), "base_answers"),
    (lambda: R.generate_reading(words), "nothing to generate"),
    (lambda: R.make_number(__import__("random").Random(0), "roman", "train"), "number kind"),
    (lambda: R.split_of(""), "non-empty"),
    (lambda: eval_layout([], "no placeholder"), "placeholder"),
])
def test_input_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_niah_tokenizer_must_count():
    with pytest.raises(TypeError, match="tokenizer"):
        R.generate_niah_docs(42)


def test_report_scores_perfect_and_blind_answers():
    recs = R.generate_reading(words, split="dev", seed=0, n_facts=6, n_numbers=6, n_niah_per_bin=2,
                              niah_bins=((32, 128),), n_nohijack=2)
    idx = qa_index(recs)
    rows = [{"sample_id": sid, "method": "d2l", "prediction": qa["answers"][0]} for sid, (_, qa) in idx.items()]
    rows += [{"sample_id": sid, "method": "base", "prediction": "1999"} for sid in idx]
    rep = reading_report(recs, rows)
    perfect = rep["d2l"]
    assert all(v["mean"] == 1.0 for k, v in perfect.items() if "chitchat" not in k), perfect
    assert perfect["numbers/exact/all"]["n"] == sum(qa.get("qa_kind") == "number" for _, qa in idx.values())
    assert rep["base"]["numbers/exact/all"]["mean"] < 0.2 and rep["base"]["nohijack/general/accuracy"]["mean"] == 0
    assert 0 < rep["blind_floor_f1"]["profession"] < 1
    with pytest.raises(ValueError, match="not a question"):
        reading_report(recs, [{"sample_id": "x/0", "method": "d2l", "prediction": ""}])


def test_report_scores_copy_needles_exactly():
    recs = R.generate_copy_docs(words, bins=((32, 128),), n_per_bin=8, seed=1, absent_prob=0.0)
    idx = qa_index(recs)
    rows = [{"sample_id": sid, "method": "d2l", "prediction": qa["answers"][0] + "."} for sid, (_, qa) in idx.items()]
    rows += [{"sample_id": sid, "method": "base", "prediction": "It is " + qa["answers"][0]}
             for sid, (_, qa) in idx.items()]
    rep = reading_report(recs, rows)
    n = len(idx)
    assert rep["d2l"]["copy/exact/all"] == {"n": n, "mean": 1.0} and rep["d2l"]["copy/by_bin/32-128"]["mean"] == 1.0
    assert sum(rep["d2l"][f"copy/exact/{k}"]["n"] for k in ("word", "person", "code")) == n
    assert rep["base"]["copy/exact/all"]["mean"] == 0.0 and 0 < rep["base"]["copy/f1/all"]["mean"] < 1


def test_blind_floor_is_best_constant():
    qas = [{"answers": ["cello"]}, {"answers": ["cello"]}, {"answers": ["harp"]}]
    assert blind_floor(qas) == pytest.approx(2 / 3)


def test_chunked_dataset_matches_internalize_chunks(tmp_path):
    pytest.importorskip("pyarrow")
    from d2l_fast.packing import PackedContexts
    from d2l_fast.training.data import iter_parquet
    from d2l_fast.training.gen_data import generate_data
    from d2l_fast.training.reading_run import chunk_dataset

    from .._tiny import tiny_model, tiny_tokenizer

    tok, m = tiny_tokenizer("llama"), tiny_model("llama")
    recs = R.generate_long_docs(tok, split="train", bins=((200, 400),), n_per_bin=2, seed=0)
    recs += R.generate_fact_docs(2, seed=0)
    generate_data(m, tok, eval_layout(recs, "Answer.\n\n{question}"), tmp_path / "raw", gold=True, system="")
    st = chunk_dataset(tmp_path / "raw", tmp_path / "chunked", tok, 96)
    got = list(iter_parquet(tmp_path / "chunked", teacher=False))
    want = PackedContexts.from_documents(tok, [r["context"] for r in recs], max_chunk_len=96)
    assert st["rows"] == 4 and st["rows_split"] == sum(n > 1 for n in want.n_chunks) >= 2
    chunks, k = [], 0
    for n in want.n_chunks:
        chunks.append(want.chunks[k : k + n])
        k += n
    assert sorted(ex.ctx_chunks for ex in got) == sorted(chunks)
    assert max(len(ex.ctx_chunks) for ex in got) > 1
    with pytest.raises(ValueError, match="max_chunk_len"):
        chunk_dataset(tmp_path / "raw", tmp_path / "x", tok, 0)


def test_fewshot_examples_come_from_the_train_split():
    from d2l_fast.training.reading_run import fewshot_examples

    ex = fewshot_examples()
    assert len(ex) == 3 and ex == fewshot_examples()
    assert ex[1][2] == P.NOT_STATED and ex[0][2] in ex[0][0] and ex[2][2] in ex[2][0]
    for doc, q, _ in ex:
        names = {w for w in re.findall(r"\b[A-Z][a-z]+\b", doc + " " + q) if w.lower() not in _common_words()}
        assert names and all(R.split_of(w) == "train" for w in names)
    assert R.split_of(ex[2][2]) == "train"  # the number pool of the train split
    train_q = {t for d in (*P.PERSON_ATTRIBUTES.values(), *P.NUMBER_ATTRIBUTES.values())
               for t in d["questions"]["train"]}
    assert all(any(re.fullmatch(re.escape(t).replace(r"\{name\}", ".+"), q) for t in train_q) for _, q, _ in ex)


def test_copy_needles_are_train_only_verbatim_and_deterministic():
    bins = ((32, 128), (256, 512))
    recs = R.generate_copy_docs(words, bins=bins, n_per_bin=20, seed=4, max_needles=3, absent_prob=0.5)
    assert recs == R.generate_copy_docs(words, bins=bins, n_per_bin=20, seed=4, max_needles=3, absent_prob=0.5)
    assert recs != R.generate_copy_docs(words, bins=bins, n_per_bin=20, seed=5, max_needles=3, absent_prob=0.5)
    assert len(recs) == 40 and len({r["id"] for r in recs}) == 40
    kinds, n_needles = set(), set()
    for r in recs:
        validate_record(r, r["id"], need_answers=True)
        lo, hi = r["meta"]["bin"]
        assert r["meta"]["kind"] == "copy" and lo <= r["meta"]["n_tokens"] < hi
        copies = [q for q in r["qas"] if q["qa_kind"] == "copy"]
        n_needles.add(len(copies))
        groups = [q["attribute"] for q in r["qas"]]
        assert len(set(groups)) == len(groups)  # each needle and the absent question: a different group
        for q in copies:
            kinds.add(q["value_kind"])
            assert q["answers"][0] in r["context"] and not q["answers"][0].isdigit()
            if q["value_kind"] == "code":
                assert any(c.isdigit() for c in q["answers"][0]) and any(c.isalpha() for c in q["answers"][0])
        for q in r["qas"]:
            if q["qa_kind"] == "absent":
                assert q["answers"] == [P.NOT_STATED] and P.NOT_STATED not in r["context"]
    assert kinds == {"word", "person", "code"} and n_needles == {1, 2, 3}
    assert any(q["qa_kind"] == "absent" for r in recs for q in r["qas"])
    with pytest.raises(ValueError, match="training task"):
        R.generate_copy_docs(words, split="dev", n_per_bin=2)
    with pytest.raises(ValueError, match="max_needles"):
        R.generate_copy_docs(words, n_per_bin=2, max_needles=99)


def test_copy_diagnostic_swaps_in_real_values():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "copy_diagnostic.py"
    if not path.exists():
        pytest.skip("needs the source tree's scripts")
    spec = importlib.util.spec_from_file_location("copy_diagnostic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recs = R.generate_copy_docs(words, bins=((32, 128),), n_per_bin=12, seed=2, absent_prob=0.0)
    real = mod.with_real_values(recs)
    assert len(real) == len(recs) and not {r["id"] for r in real} & {r["id"] for r in recs}
    kinds = set()
    for old, new in zip(recs, real):
        validate_record(new, new["id"], need_answers=True)
        for qa_old, qa_new in zip(old["qas"], new["qas"]):
            kinds.add(qa_new["value_kind"])
            assert qa_new["question"] == qa_old["question"] and qa_new["answers"][0] in new["context"]
            if qa_old["value_kind"] == "code":
                assert qa_new == qa_old
            else:
                pool = mod.REAL_PEOPLE if qa_old["value_kind"] == "person" else mod.REAL_WORDS
                assert qa_new["answers"][0] in pool and qa_old["answers"][0] not in new["context"]
                assert qa_new["value_kind"] == "real_" + qa_old["value_kind"]
    assert kinds == {"code", "real_word", "real_person"}


def test_rebase_general_asks_the_train_pool_with_the_base_models_answers():
    recs = R.generate_reading(words, split="train", seed=2, n_facts=40, n_nohijack=6)
    answers = {q: f"base says {i}" for i, q in enumerate(R.general_training_questions())}
    out = R.rebase_general(recs, answers, seed=2)
    assert out == R.rebase_general(recs, answers, seed=2) and len(out) == len(recs)
    general = [qa for r in out for qa in r["qas"] if qa["qa_kind"] == "general"]
    assert len(general) >= 6 and len({qa["question"] for qa in general}) > 3
    assert all(qa["answers"] == [answers[qa["question"]]] and qa["gold_source"] == "base" for qa in general)
    for r, o in zip(recs, out):  # only the general questions change; the input is not modified
        assert r["context"] == o["context"] and len(r["qas"]) == len(o["qas"])
        for a, b in zip(r["qas"], o["qas"]):
            assert a == b or a["qa_kind"] == "general" and "gold_source" not in a
    # an answer list the pool does not cover is still used whole; held-out records are refused
    assert {qa["question"] for r in R.rebase_general(recs, {"Q?": "A"}) for qa in r["qas"]
            if qa["qa_kind"] == "general"} == {"Q?"}
    dev = R.generate_reading(words, split="dev", seed=2, n_facts=4)
    for bad, match in ((dev, "held-out"), ({"id": 1}, "records"), ([{"qas": []}], "records")):
        with pytest.raises(ValueError, match=match):
            R.rebase_general(bad, answers)
    for bad in ({}, {"q": ""}, [("q", "a")]):
        with pytest.raises(ValueError, match="base_answers"):
            R.rebase_general(recs, bad)


def test_train_general_questions_share_no_four_words_or_subject_with_held_out_ones():
    train = R.general_training_questions()
    assert len(train) == len(set(train)) >= 150
    held = [q for s in ("dev", "test") for q, _ in P.GENERAL_QUESTIONS[s]]
    def grams(t):
        w = re.findall(r"[a-z]+", t.lower())
        return {tuple(w[i:i + 4]) for i in range(len(w) - 3)}

    held_grams = set().union(*(grams(q) for q in held))
    assert not [q for q in train if grams(q) & held_grams]
    for subject in ("Italy", "Spain", "Japan", "England", "bicycle", "triangle", "snow", "grass", "red planet"):
        assert not [q for q in train if subject.lower() in q.lower()], subject
