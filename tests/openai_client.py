"""Drives `tern serve` with the official OpenAI Python client (PyPI `openai`), as a user would.

    python tests/openai_client.py http://127.0.0.1:PORT/v1

The server runs SmolLM2-135M-Instruct in full precision with --api-key k (tests/serve.rs starts
it). Checks: models list, chat (whole and streamed: same text, usage adds up), a completion,
log-probabilities on both endpoints, and
that the client raises its typed errors for a bad request and a wrong key. Prints one JSON line.
"""
import json
import sys
import time
import urllib.request

import openai

base = sys.argv[1]
deadline = time.time() + 120
while True:  # the server loads the model first
    try:
        urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=2)
        break
    except Exception:
        if time.time() > deadline:
            sys.exit("the server did not come up")
        time.sleep(0.3)

client = openai.OpenAI(base_url=base, api_key="k")
assert [m.id for m in client.models.list().data] == ["smollm2"]

ask = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model="smollm2", messages=ask, max_tokens=16, temperature=0)
chat = r.choices[0].message.content
u = r.usage
assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 16, u

pieces, usage, reason = [], None, None
for chunk in client.chat.completions.create(
    model="smollm2", messages=ask, max_tokens=16, temperature=0, stream=True
):
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        reason = c.finish_reason or reason
assert "".join(pieces) == chat, ("".join(pieces), chat)
assert usage is not None and usage.completion_tokens == u.completion_tokens, usage
assert reason == r.choices[0].finish_reason, reason

c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
completion = c.choices[0].text
assert c.usage.completion_tokens == 5 and c.choices[0].finish_reason == "length", c

# Log-probabilities as the client types them: chat's content list, completions' lists.
r = client.chat.completions.create(model="smollm2", messages=ask, max_tokens=4, temperature=0,
                                   logprobs=True, top_logprobs=2)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop"), content
assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content), content
assert "".join(t.token for t in content) == r.choices[0].message.content, content
assert abs(content[0].top_logprobs[0].logprob - content[0].logprob) < 1e-6, content[0]
c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3,
                              temperature=0, logprobs=1)
assert "".join(c.choices[0].logprobs.tokens) == c.choices[0].text, c.choices[0].logprobs

try:
    client.chat.completions.create(model="smollm2", messages=ask, max_tokens=100000)
    sys.exit("a max_tokens beyond the context was accepted")
except openai.BadRequestError as e:
    bad = str(e)
try:
    openai.OpenAI(base_url=base, api_key="wrong").models.list()
    sys.exit("a wrong API key was accepted")
except openai.AuthenticationError:
    pass

print(json.dumps({"chat": chat, "completion": completion, "bad_request": bad}))
