"""Joint CTC / decoder transcription (speech/ctc_prefix.py): the prefix scores against a brute
force sum over every frame path, and the search against what its weights must give."""
import itertools
import math

import pytest
import torch

import mm
from speech.adapter import BLANK
from speech.ctc_prefix import CTCPrefixScorer, JointSampler
from tests.test_speech import tone


def collapse(path):
    out = []
    for j, c in enumerate(path):
        if c != BLANK and (j == 0 or c != path[j - 1]):
            out.append(c - 1)  # class i + 1 is decoder token i
    return out


def brute_force(log_probs, length):
    """Every frame path of the first `length` outputs -> {labelling: probability}."""
    p = log_probs[:length].exp().double()
    totals = {}
    for path in itertools.product(range(p.shape[1]), repeat=length):
        labels = tuple(collapse(path))
        totals[labels] = totals.get(labels, 0.0) + math.prod(float(p[t, c]) for t, c in enumerate(path))
    return totals


def test_prefix_scores_match_the_sum_over_frame_paths():
    torch.manual_seed(0)
    log_probs = torch.randn(2, 5, 4).mul(2).log_softmax(-1)  # blank + tokens 0, 1, 2
    lengths = torch.tensor([5, 3])  # row 1 ends early: its padded outputs count for nothing
    scorer = CTCPrefixScorer(log_probs, lengths)
    truth = [brute_force(log_probs[r], int(lengths[r])) for r in range(2)]

    def psi(r, prefix):
        return sum(v for k, v in truth[r].items() if k[:len(prefix)] == tuple(prefix))

    prefix = [[], []]
    for chosen in ([1, 2], [1, 0], [0, 0]):  # a repeated token (row 0: 1 then 1 ... ) is the hard case
        candidates = torch.tensor([[0, 1, 2], [0, 1, 2]])
        scores, r_n, r_b = scorer.extend(candidates)
        for r in range(2):
            for j, c in enumerate(candidates[r].tolist()):
                assert math.isclose(float(scores[r, j].exp()), psi(r, prefix[r] + [c]), rel_tol=1e-4, abs_tol=1e-9)
        pick = torch.tensor(chosen)
        scorer.advance(pick, r_n[torch.arange(2), pick], r_b[torch.arange(2), pick], scores[torch.arange(2), pick])
        prefix = [prefix[0] + [chosen[0]], prefix[1] + [chosen[1]]]
        for r in range(2):  # the whole labelling is exactly the prefix
            assert math.isclose(float(scorer.full()[r].exp()), truth[r].get(tuple(prefix[r]), 0.0),
                                rel_tol=1e-4, abs_tol=1e-9)


class Inputs:
    def __init__(self, logits, rows):
        self.token_logits = (logits, torch.ones(logits.shape[:2], dtype=torch.bool))
        self.ids = torch.zeros(rows, 3, dtype=torch.long)


def sure_head(heard, vocab):
    """Token head logits [1, T, 1 + vocab] that read `heard` (classes; 0 blank) with certainty."""
    return torch.nn.functional.one_hot(torch.tensor(heard), vocab + 1).float()[None].mul(20)


def run(sampler, decoder_logits, steps):
    out = []
    for _ in range(steps):
        token = int(sampler(decoder_logits)[0])
        out.append(token)
        if token == STOP:
            break
    return out


STOP = 9


def test_joint_search_follows_the_head_where_it_is_sure_and_stops_when_the_speech_is_said():
    vocab = 10
    head = sure_head([0, 4, 4, 0, 4, 0, 6, 0], vocab)  # tokens 3, 3, 5 (a blank between the two 3s)
    decoder = torch.zeros(1, vocab)
    decoder[0, 7] = 5.0  # the decoder wants token 7 every time
    joint = JointSampler([STOP], weight=0.5, candidates=2).bind(Inputs(head, 1))
    assert run(joint, decoder, 8) == [3, 3, 5, STOP]
    alone = JointSampler([STOP], weight=0.0, candidates=2).bind(Inputs(head, 1))
    assert run(alone, decoder, 4) == [7, 7, 7, 7]  # weight 0: the decoder's own greedy choice
    with pytest.raises(ValueError):
        JointSampler([STOP], weight=1.5)


def test_joint_search_lets_the_decoder_choose_where_the_head_is_unsure():
    vocab = 10
    head = torch.zeros(1, 3, vocab + 1)
    head[0, :, 0] = 3.0
    head[0, 1, 3], head[0, 1, 4] = 6.0, 6.0  # output 1: token 2 or token 3, the head can't tell
    decoder = torch.zeros(1, vocab)
    decoder[0, 3] = 4.0  # the decoder prefers token 3
    joint = JointSampler([STOP], weight=0.5, candidates=3).bind(Inputs(head, 1))
    assert run(joint, decoder, 4)[:2] == [3, STOP]


def test_transcribe_uses_the_joint_search_with_a_token_head(monkeypatch, tmp_path):
    import soundfile

    torch.manual_seed(0)
    model = mm.load("tiny", overrides=["speech.adapter.tokens=true"]).eval()
    path = tmp_path / "a.flac"
    soundfile.write(path, tone(1.0, 440), 16000)
    vocab = model.decoder.get_input_embeddings().weight.shape[0]
    heard = [17, 0, 42, 0, 99]  # tokens 16, 41, 98

    def sure(h, mask, table):
        best = torch.tensor(heard + [0] * (h.shape[1] - len(heard)))
        return torch.nn.functional.one_hot(best, vocab + 1).float()[None].expand(h.shape[0], -1, -1).mul(30)

    monkeypatch.setattr(model.speech_adapter.tokens, "forward", sure)
    expected = model.tokenizer.decode([16, 41, 98])
    assert model.transcribe(str(path), ctc_weight=0.9) == expected
    assert model.transcribe([str(path), str(path)], ctc_weight=0.9) == [expected, expected]
    decoder_alone = model.transcribe(str(path), ctc_weight=0.0, max_new_tokens=6)
    assert decoder_alone == model.generate("Repeat after me in English: <|audio|>", audio=str(path),
                                           max_new_tokens=6)
    with pytest.raises(mm.InputError, match="ctc_weight"):
        model.transcribe(str(path), ctc_weight=2.0)
