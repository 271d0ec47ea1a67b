"""Worker run by benchmarks/peer_env.py inside the peer environment: ONNX Runtime GenAI's greedy generator over
one model folder, timed here so that no pipe or JSON time is counted.

    peer_worker.py MODEL_FOLDER THREADS    (stdin: one JSON request a line {"prompt": [ids], "new_tokens": N};
                                            stdout: one JSON reply a line)

The first line out describes the model; then, per request, {"prefill_s", "decode_s", "tokens"}: prefill is
`append_tokens(prompt)` (the model over the prompt); the first token is the search over those logits; decode is
the other N - 1 tokens (`generate_next_token`: the model over the last token, then its greedy search).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import onnxruntime_genai as og

    folder, threads = sys.argv[1], int(sys.argv[2])
    try:
        model = og.Model(folder)
    except Exception as e:  # the reply carries the error to the benchmark's process
        print(json.dumps({"error": f"og.Model({folder!r}): {e}"}), flush=True)
        return
    print(json.dumps({"onnxruntime_genai": og.__version__, "model": folder, "threads": threads}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        prompt, n = req["prompt"], req["new_tokens"]
        length = len(prompt) + n
        params = og.GeneratorParams(model)
        # min_length = max_length: no early stop at an EOS id (our engines generate exactly n tokens too)
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        t2 = time.perf_counter()
        while len(tokens) < n:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        t3 = time.perf_counter()
        del gen
        print(json.dumps({"prefill_s": t1 - t0, "first_token_s": t2 - t1, "decode_s": t3 - t2, "tokens": tokens}),
              flush=True)


if __name__ == "__main__":
    main()
