"""The official `openai` SDK against satstream's HTTP face (run by tests/integration/http.rs).

argv[1]: JSON {"base_url", "api_key", "model", "max_tokens"}. Prints one JSON object per
case on stdout: what the SDK returned (text, finish reason, usage, the `satstream` extension,
the session header), or the error it raised (its class and HTTP status).
"""
import json
import sys

import openai

cfg = json.loads(sys.argv[1])
client = openai.OpenAI(base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0, timeout=120)
model, n = cfg["model"], cfg["max_tokens"]
chat = [{"role": "user", "content": "hi"}]


def out(case, **kw):
    print(json.dumps({"case": case, **kw}), flush=True)


def chat_whole():
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=chat, max_tokens=n, temperature=0)
    r = raw.parse()
    out("chat", text=r.choices[0].message.content, finish_reason=r.choices[0].finish_reason,
        usage=r.usage.model_dump(), satstream=r.model_extra.get("satstream"),
        session=raw.headers.get("x-satstream-session-id"))


def chat_stream():
    text, finish, usage, ext = "", None, None, None
    roles = []
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=chat, max_completion_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True}) as raw:
        session = raw.headers.get("x-satstream-session-id")
        for c in raw.parse():
            if c.usage is not None:
                usage = c.usage.model_dump()
            for ch in c.choices:
                if ch.delta.role:
                    roles.append(ch.delta.role)
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
            ext = (c.model_extra or {}).get("satstream") or ext
    out("chat_stream", text=text, finish_reason=finish, usage=usage, satstream=ext,
        session=session, roles=roles)


def text_whole():
    r = client.completions.create(model=model, prompt="hi", max_tokens=n, temperature=0)
    out("text", text=r.choices[0].text, finish_reason=r.choices[0].finish_reason,
        usage=r.usage.model_dump(), satstream=r.model_extra.get("satstream"))


def text_stream():
    text, finish, ext = "", None, None
    for c in client.completions.create(model=model, prompt="hi", max_tokens=n, temperature=0,
                                       stream=True):
        for ch in c.choices:
            text += ch.text or ""
            finish = ch.finish_reason or finish
        ext = (c.model_extra or {}).get("satstream") or ext
    out("text_stream", text=text, finish_reason=finish, satstream=ext)


def refused(case, call):
    try:
        call()
        out(case, error=None)
    except openai.APIStatusError as e:
        out(case, error=type(e).__name__, status=e.status_code, message=e.message)


def models():
    out("models", ids=[m.id for m in client.models.list().data])


models()
chat_whole()
chat_stream()
text_whole()
text_stream()
bad = openai.OpenAI(base_url=cfg["base_url"], api_key="00" * 32, max_retries=0)
refused("wrong_key", lambda: bad.chat.completions.create(model=model, messages=chat, max_tokens=n))
refused("unknown_model", lambda: client.chat.completions.create(model="nope", messages=chat,
                                                                 max_tokens=n))
refused("two_choices", lambda: client.chat.completions.create(model=model, messages=chat,
                                                               max_tokens=n, n=2))
