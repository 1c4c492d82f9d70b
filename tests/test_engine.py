"""The batched engine: every request gets what it gets alone, whatever else runs beside it."""

import pytest
import torch

from xiaolm.inference.engine import Engine, QueueFull, Request, StopStrings, stream_completion
from xiaolm.inference.sampling import SamplingConfig, sample_next, sample_rows
from xiaolm.model.transformer import Transformer

from conftest import decode_alone_and_together, greedy_reference, tiny_model_config


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=96)).eval()


def prompts(tokenizer):
    texts = ["三国时期，", "To be, or not to be", "本法所称", "a", "今天天气很好，我们去", "Hello world. " * 3]
    return [tokenizer.encode(t) for t in texts]


def test_greedy_requests_together_equal_alone_and_full_forward(model, tokenizer):
    # lengths and limits differ, and 6 requests share 4 slots: some wait, join mid-way, rows move
    ids = prompts(tokenizer)
    samplings = [SamplingConfig(max_new_tokens=n, temperature=0) for n in (20, 7, 30, 12, 3, 25)]
    alone, together = decode_alone_and_together(model, ids, samplings, num_slots=4)
    for prompt, a, b, sampling in zip(ids, alone, together, samplings):
        assert b.output_ids == a.output_ids == greedy_reference(model, prompt, sampling.max_new_tokens)
        assert b.finish_reason == a.finish_reason == "length"


def test_seeded_sampling_together_equals_alone(model, tokenizer):
    ids = prompts(tokenizer)
    samplings = [
        SamplingConfig(max_new_tokens=24, temperature=1.0, seed=1),
        SamplingConfig(max_new_tokens=24, temperature=0.7, top_p=0.9, seed=2),
        SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=20, repetition_penalty=1.3, seed=3),
        SamplingConfig(max_new_tokens=24, temperature=0),
        SamplingConfig(max_new_tokens=24, temperature=0.9, presence_penalty=1.5, frequency_penalty=0.5, seed=4),
        SamplingConfig(max_new_tokens=24, temperature=1.0, seed=1),  # the first's seed: its own stream
    ]
    alone, together = decode_alone_and_together(model, ids, samplings, num_slots=3)
    for a, b in zip(alone, together):
        assert a.output_ids == b.output_ids
    assert alone[0].output_ids != alone[5].output_ids  # same seed, different prompt


def test_batched_sampling_rows_equal_one_row_at_a_time():
    logits = torch.randn(5, 50)
    configs = [SamplingConfig(temperature=0.8, top_p=0.9, seed=i) for i in range(5)]
    batched = sample_rows(logits, configs, [torch.Generator().manual_seed(i) for i in range(5)])
    single = [int(sample_next(logits[i:i + 1], configs[i], torch.Generator().manual_seed(i))) for i in range(5)]
    assert batched == single


def test_stop_strings_are_cut_exactly_even_across_pieces():
    stops = StopStrings(["</s>", "STOP"])
    out = []
    for piece in ["Hello <", "/", "s", "> never"]:
        text, hit = stops.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello " and hit
    stops = StopStrings(["ab"])
    assert stops.push("xa") == ("x", False)  # "a" may start "ab": held back
    assert stops.push("c") == ("ac", False)  # it did not
    assert stops.push("a") == ("", False) and stops.flush() == "a"  # the end of the reply releases it


def test_stop_string_spanning_tokens_in_the_engine(model, tokenizer):
    prompt = tokenizer.encode("To be, or not to be")
    greedy = SamplingConfig(max_new_tokens=30, temperature=0)
    full = Request(prompt, greedy, stop_ids=frozenset(tokenizer.stop_ids))
    text = "".join(Engine(model, tokenizer).stream(full))
    # a stop string made of the end of one token and the start of the next
    pieces = [tokenizer.token_bytes()[t] for t in full.output_ids]
    boundary = len(pieces[0]) + len(pieces[1])
    raw = b"".join(pieces)
    stop = raw[boundary - 1:boundary + 1].decode("utf-8", errors="ignore")
    assume_found = text.find(stop)
    assert stop and assume_found >= 0
    cut = Request(prompt, greedy, stop_ids=frozenset(tokenizer.stop_ids), stop_strings=(stop,))
    streamed = list(Engine(model, tokenizer).stream(cut))
    assert "".join(streamed) == text[:assume_found] and cut.finish_reason == "stop"
    assert all(stop not in piece for piece in streamed)


def test_finished_and_cancelled_requests_free_their_slot_at_once(model, tokenizer):
    engine = Engine(model, tokenizer, num_slots=2, max_waiting=1)  # 2 may wait for the 2 free slots, 1 more
    long = SamplingConfig(max_new_tokens=50, temperature=0)
    first, second, third = (Request(tokenizer.encode(t), long) for t in ("a", "b", "c"))
    for request in (first, second, third):
        engine.submit(request)
    with pytest.raises(QueueFull):
        engine.submit(Request(tokenizer.encode("d"), long))
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1  # third waits: no free slot
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    first.cancel()
    engine.step()  # first leaves, third joins at the same step
    assert first.finish_reason == "cancelled" and engine.num_running == 2 and engine.num_waiting == 0
    second.cancel()
    third.cancel()
    engine.step()
    assert engine.num_running == 0 and not engine.step()


def test_stream_completion_stops_at_the_context_and_cancels_when_left(model, tokenizer):
    text = "".join(stream_completion(model, tokenizer, "三国", SamplingConfig(max_new_tokens=500, temperature=0)))
    assert text  # the 96-token context ended it, not the 500-token limit
    engine = Engine(model, tokenizer)
    request = Request(tokenizer.encode("三国"), SamplingConfig(max_new_tokens=80, temperature=0))
    stream = engine.stream(request)
    next(stream)
    stream.close()  # the reader went away
    assert request.finish_reason == "cancelled" and engine.num_running == 0


@pytest.mark.parametrize("prompt, message", [([], "prompt is empty"), (list(range(96)), "context holds 96"),
                                             ([10**6], "token ids must be in")])
def test_requests_the_engine_cannot_run_are_refused(model, tokenizer, prompt, message):
    with pytest.raises(ValueError, match=message):
        Engine(model, tokenizer).submit(Request(prompt, SamplingConfig()))


def test_a_failing_step_ends_its_requests_with_an_error_and_the_loop_goes_on(model, tokenizer):
    import threading

    engine = Engine(model, tokenizer, num_slots=2)
    stop, errors = threading.Event(), []
    thread = threading.Thread(target=engine.run_forever, args=(stop, errors.append), daemon=True)
    thread.start()
    try:
        broken = SamplingConfig(max_new_tokens=8, temperature=1.0)
        broken.temperature = float("nan")  # past validation: the sampler fails inside the step
        done = [threading.Event() for _ in range(2)]
        bad = Request(tokenizer.encode("a"), broken, listener=lambda r, t: t is None and done[0].set())
        engine.submit(bad)
        assert done[0].wait(60) and bad.finish_reason == "error" and "RuntimeError" in bad.error
        good = Request(tokenizer.encode("a"), SamplingConfig(max_new_tokens=4, temperature=0),
                       listener=lambda r, t: t is None and done[1].set())
        engine.submit(good)
        assert done[1].wait(60) and good.finish_reason == "length" and len(good.output_ids) == 4
        assert len(errors) == 1 and engine.num_running == 0
    finally:
        stop.set()
        engine.wake()
        thread.join(30)
