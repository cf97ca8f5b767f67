// satstream's chat page: a client of the HTTP face's own endpoints (/v1/models, /v1/account,
// /v1/account/topup, /v1/account/refund, /v1/chat/completions, /v1/receipts). Text from the
// person and from the model is only ever inserted as text (textContent), never as HTML.
'use strict';

const KEY = 'satstream.account_token';
// The answer being streamed, as shown so far: if the page closes mid-answer, the next load
// shows what was paid for and checks it against the receipt.
const PROGRESS = 'satstream.answer_in_progress';
const $ = (id) => document.getElementById(id);
const state = {
  token: localStorage.getItem(KEY) || '',
  models: [],
  history: [],
  answer: null, // the answer being streamed: { ctrl, el, ... }
  topup: null, // the top-up being waited for: { hash, deadline }
};

// ---- talking to the server ----

class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function headers(json) {
  const h = {};
  if (json) h['Content-Type'] = 'application/json';
  if (state.token) h.Authorization = 'Bearer ' + state.token;
  return h;
}

async function request(path, opts = {}) {
  let res;
  try {
    res = await fetch(path, { ...opts, headers: headers(opts.body !== undefined) });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError('The server cannot be reached. Check your connection and try again.', 0);
  }
  return res;
}

async function api(path, opts = {}) {
  const res = await request(path, opts);
  let body = null;
  try {
    body = await res.json();
  } catch (_) {
    // Not JSON: said below.
  }
  if (!res.ok) {
    const said = body && body.error && body.error.message;
    throw new ApiError(said || `The server answered ${res.status} ${res.statusText}.`, res.status, body);
  }
  if (body === null) throw new ApiError('The server sent an answer this page cannot read.', res.status);
  return body;
}

// ---- what the person sees ----

function notice(text, kind = 'error') {
  const n = $('notice');
  n.textContent = text;
  n.className = kind === 'info' ? 'notice info' : 'notice';
  n.hidden = !text;
}

const sats = (msat) => {
  const s = msat / 1000;
  return Number.isInteger(s) ? s.toLocaleString('en') : s.toLocaleString('en', { maximumFractionDigits: 3 });
};

function showBalance(account) {
  state.available = account.available_msat;
  $('balance').textContent = sats(account.available_msat);
  $('balance-pill').hidden = false;
  $('balance-pill').dataset.msat = String(account.available_msat);
  $('m-left').textContent = sats(account.available_msat);
  $('m-left').dataset.msat = String(account.available_msat);
}

function showKey() {
  $('key-none').hidden = !!state.token;
  $('key-some').hidden = !state.token;
  $('key-masked').textContent = state.token ? state.token.slice(0, 6) + '…' + state.token.slice(-4) : '';
  if (!state.token) $('balance-pill').hidden = true;
}

function setToken(token) {
  state.token = token;
  if (token) localStorage.setItem(KEY, token);
  else localStorage.removeItem(KEY);
  showKey();
}

async function refreshAccount() {
  if (!state.token) return null;
  try {
    const a = await api('/v1/account');
    showBalance(a);
    return a;
  } catch (e) {
    if (e.status === 401) {
      notice('This browser\'s key is not known to the server (it may be another server\'s). Top up to open a new account, or use a key you have.');
    } else {
      notice(e.message);
    }
    return null;
  }
}

async function copy(text, button) {
  const was = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = 'Copied';
  } catch (_) {
    button.textContent = 'Copy failed: select and copy by hand';
  }
  setTimeout(() => { button.textContent = was; }, 1500);
}

// ---- models and prices ----

function showPrice() {
  const m = state.models.find((x) => x.id === $('model').value);
  if (!m) return;
  const p = m.satstream || {};
  const perToken = p.msat_per_token || 0;
  const perPrompt = p.msat_per_prompt_token || 0;
  // A typical chat turn: a 50-token question, a 200-token answer.
  const typical = 50 * perPrompt + 200 * perToken;
  $('price').textContent =
    `${sats(perToken)} ${perToken === 1000 ? 'sat' : 'sats'} per answer token, ${sats(perPrompt)} per prompt token; ` +
    `paid every ${p.chunk_tokens || 1} tokens. A typical answer (50-token question, 200 tokens) costs about ${sats(typical)} sats.`;
}

async function loadModels() {
  try {
    const list = await api('/v1/models');
    state.models = list.data || [];
    const sel = $('model');
    sel.replaceChildren();
    for (const m of state.models) {
      const o = document.createElement('option');
      o.value = m.id;
      o.textContent = m.id;
      sel.append(o);
    }
    showPrice();
  } catch (e) {
    $('price').textContent = 'The price list could not be loaded.';
    notice(e.message);
  }
}

// ---- top-up ----

function invoiceStatus(text, kind) {
  const s = $('invoice-status');
  s.textContent = text;
  s.className = 'status' + (kind ? ' ' + kind : '');
}

async function topUp() {
  notice('');
  const amount = Number($('amount').value) * 1000;
  const before = state.token ? await refreshAccount() : null;
  let t;
  try {
    t = await api('/v1/account/topup', { method: 'POST', body: JSON.stringify({ amount_msat: amount }) });
  } catch (e) {
    notice(e.message);
    return;
  }
  if (t.account_token) setToken(t.account_token);
  $('invoice-box').hidden = false;
  $('invoice').value = t.bolt11;
  $('invoice').dataset.paymentHash = t.payment_hash;
  $('qr').src = '/qr.svg?data=' + encodeURIComponent('lightning:' + t.bolt11.toUpperCase());
  $('open-wallet').href = 'lightning:' + t.bolt11;
  $('webln-pay').hidden = !window.webln;
  $('webln-pay').disabled = false;
  invoiceStatus('Waiting for the payment…');
  const topup = {
    hash: t.payment_hash,
    want: (before ? before.credited_msat : 0) + t.amount_msat,
    deadline: t.expires_at_unix * 1000,
  };
  state.topup = topup;
  await waitForPayment(topup, t.amount_msat);
}

// The server says when the payment arrived (the balance is credited), not the wallet.
async function waitForPayment(topup, amount) {
  while (state.topup === topup) {
    if (Date.now() > topup.deadline) {
      invoiceStatus('The invoice expired before it was paid. Top up again for a new one.', 'bad');
      $('invoice-box').hidden = true;
      state.topup = null;
      return;
    }
    let a = null;
    try {
      a = await api('/v1/account');
    } catch (e) {
      invoiceStatus(e.status ? e.message : 'The server cannot be reached; still trying…', 'bad');
    }
    if (a) {
      showBalance(a);
      if (a.credited_msat >= topup.want) {
        invoiceStatus(`Paid: ${sats(amount)} sats added.`, 'good');
        $('invoice-box').hidden = true;
        state.topup = null;
        return;
      }
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function payWithWallet() {
  const button = $('webln-pay');
  button.disabled = true;
  try {
    await window.webln.enable();
    await window.webln.sendPayment($('invoice').value);
    invoiceStatus('The wallet says it paid; waiting for the server to see it…');
  } catch (e) {
    invoiceStatus(`The wallet did not pay: ${e && e.message ? e.message : e}`, 'bad');
    button.disabled = false;
  }
}

// ---- chat ----

function addMessage(role, text) {
  $('empty').hidden = true;
  const el = document.createElement('div');
  el.className = 'msg ' + role;
  const body = document.createElement('span');
  body.className = 'text';
  body.textContent = text;
  el.append(body);
  $('log').append(el);
  toBottom();
  return el;
}

// Follows the answer inside the log only: the page itself (and the Stop button) stays put.
function toBottom() {
  const log = $('log');
  log.scrollTop = log.scrollHeight;
}

function addNote(el, text, bad) {
  const n = document.createElement('span');
  n.className = 'note' + (bad ? ' bad' : '');
  n.textContent = text;
  el.append(n);
  return n;
}

function meter(a) {
  $('m-tokens').textContent = String(a.tokens);
  $('m-spent').textContent = sats(a.spent);
  $('m-spent').dataset.msat = String(a.spent);
  if (a.available !== null) {
    $('m-left').textContent = sats(a.available);
    $('m-left').dataset.msat = String(a.available);
  }
  if (a.firstAt && a.tokens > 1) {
    const secs = (performance.now() - a.firstAt) / 1000;
    if (secs > 0) $('m-rate').textContent = (a.tokens / secs).toFixed(1);
  }
}

function busy(on) {
  $('send').disabled = on;
  $('stop').hidden = !on;
  $('prompt').disabled = on;
}

async function send() {
  const prompt = $('prompt').value.trim();
  if (!prompt || state.answer) return;
  notice('');
  if (!state.token) {
    notice('Top up first: the answer is paid from your balance as it streams.');
    return;
  }
  const messages = [...state.history, { role: 'user', content: prompt }];
  addMessage('user', prompt);
  $('prompt').value = '';
  const el = addMessage('assistant', '');
  const a = {
    ctrl: new AbortController(), el, text: el.querySelector('.text'), chunks: [],
    tokens: 0, spent: 0, available: null, firstAt: 0, spentBefore: null,
  };
  state.answer = a;
  el.dataset.state = 'streaming';
  meter(a);
  $('m-rate').textContent = '–';
  busy(true);
  const before = await refreshAccount();
  a.spentBefore = before ? before.spent_msat : null;
  let end = null;
  try {
    const res = await request('/v1/chat/completions', {
      method: 'POST',
      signal: a.ctrl.signal,
      body: JSON.stringify({
        model: $('model').value,
        messages,
        max_tokens: Number($('max-tokens').value),
        temperature: Number($('temperature').value),
        stream: true,
        stream_options: { include_usage: true },
      }),
    });
    a.session = res.headers.get('x-satstream-session-id');
    if (a.session) el.dataset.session = a.session;
    if (!res.ok) {
      let body = null;
      try { body = await res.json(); } catch (_) { /* said below */ }
      const said = body && body.error && body.error.message;
      if (res.status === 402) {
        throw new ApiError('Your balance is too low for this answer. Top up to continue.', 402, body);
      }
      throw new ApiError(said || `The server answered ${res.status}.`, res.status, body);
    }
    end = await readStream(res, a);
  } catch (e) {
    finish(a, null, e);
    return;
  }
  finish(a, end, null);
  if (end && a.chunks.length) {
    state.history = [...messages, { role: 'assistant', content: a.chunks.join('') }];
  }
}

// Reads the answer's server-sent events: each chunk's text, and at the end the session's
// outcome and receipt.
async function readStream(res, a) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let end = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return end;
      const obj = JSON.parse(data);
      if (obj.error) throw new ApiError(obj.error.message, 500, obj);
      const choice = (obj.choices || [])[0];
      const ext = obj.satstream || {};
      if (choice && choice.delta && choice.delta.content) {
        if (!a.firstAt) a.firstAt = performance.now();
        a.text.textContent += choice.delta.content;
        a.chunks.push(choice.delta.content);
        a.el.dataset.chunks = String(a.chunks.length);
        a.tokens += ext.tokens || 0;
        keepProgress(a);
        if (ext.spent_msat !== undefined && a.spentBefore !== null) a.spent = ext.spent_msat - a.spentBefore;
        if (ext.available_msat !== undefined) a.available = ext.available_msat;
        meter(a);
        toBottom();
      }
      if (choice && choice.finish_reason) end = { reason: choice.finish_reason, ...ext };
    }
  }
  if (!end) throw new ApiError('The answer was cut off: the connection closed before it ended.', 0);
  return end;
}

function finish(a, end, err) {
  state.answer = null;
  localStorage.removeItem(PROGRESS);
  busy(false);
  if (end) {
    if (end.paid_msat !== undefined) a.spent = end.paid_msat;
    if (end.balance_msat !== undefined) a.available = end.balance_msat;
    meter(a);
    if (end.halted === 'balance_exhausted') {
      a.el.dataset.state = 'halted';
      addNote(a.el, 'Your balance ran out, so the answer stopped here. ', true).append(topUpButton());
    } else if (end.halted) {
      a.el.dataset.state = 'halted';
      addNote(a.el, `Stopped by the server: ${end.message || end.halted}.`, true);
    } else {
      a.el.dataset.state = 'done';
      addNote(a.el, `${a.tokens} tokens, ${sats(a.spent)} sats.`);
    }
    if (end.receipt) showReceipt(a, end.receipt);
  } else if (err && err.name === 'AbortError') {
    a.el.dataset.state = 'stopped';
    addNote(a.el, `You stopped the answer: ${a.tokens} tokens, ${sats(a.spent)} sats. Nothing more is charged.`);
    laterReceipt(a);
  } else {
    a.el.dataset.state = 'failed';
    addNote(a.el, err ? err.message : 'The answer failed.', true);
    if (err && err.status === 402) a.el.append(topUpButton());
    if (a.session && a.chunks.length) laterReceipt(a);
  }
  refreshAccount();
}

// A Top up button beside an answer that ran out of balance.
function topUpButton() {
  const b = document.createElement('button');
  b.textContent = 'Top up';
  b.className = 'primary';
  b.addEventListener('click', () => { $('wallet').scrollIntoView(); topUp(); });
  return b;
}

function stop() {
  if (state.answer) state.answer.ctrl.abort();
}

// A stopped answer's session ends on the server as the connection closes; its receipt is
// there a moment later.
async function laterReceipt(a) {
  if (!a.session) return;
  const deadline = Date.now() + 15000;
  while (Date.now() < deadline) {
    try {
      const r = await api('/v1/receipts/' + encodeURIComponent(a.session));
      showReceipt(a, r);
      await refreshAccount();
      return;
    } catch (e) {
      // 409: still running; 503: its last payments are settling. Anything else is final.
      if (e.status !== 409 && e.status !== 503) {
        addNote(a.el, `No receipt: ${e.message}`, true);
        return;
      }
    }
    await new Promise((r) => setTimeout(r, 300));
  }
  addNote(a.el, 'The receipt is not ready yet: the server is still settling this answer. Reload the page in a moment.', true);
}

async function sha256hex(text) {
  const d = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(text));
  return Array.from(new Uint8Array(d), (b) => b.toString(16).padStart(2, '0')).join('');
}

// The receipt signs one line per delivered chunk with the SHA-256 of its text: recompute
// them over the text this page showed. A cut answer (stopped, dropped) may have had chunks on
// the wire that never reached the page: they are listed, and said so.
async function checkChunks(signed, shown, cut) {
  const lines = signed.split('\n').filter((l) => l.startsWith('chunk: '));
  if (!window.crypto || !crypto.subtle) return { ok: null, text: 'cannot be checked here (this page is not in a secure context)' };
  if (lines.length < shown.length || (lines.length > shown.length && !cut)) {
    return { ok: false, text: `the receipt lists ${lines.length} chunks; this page showed ${shown.length}` };
  }
  for (let i = 0; i < shown.length; i++) {
    const want = lines[i].split(' ').pop();
    if ((await sha256hex(shown[i])) !== want) return { ok: false, text: `chunk ${i} differs from the text shown` };
  }
  const extra = lines.length - shown.length;
  return {
    ok: true,
    text: `all ${shown.length} chunks shown match` +
      (extra ? `; ${extra} more ${extra === 1 ? 'was' : 'were'} already sent when the answer was cut` : ''),
  };
}

async function showReceipt(a, r) {
  const box = document.getElementById('receipt-tpl').content.firstElementChild.cloneNode(true);
  box.querySelector('.what').textContent =
    `${r.prompt_tokens} prompt + ${r.completion_tokens} answer tokens, ${sats(r.paid_msat)} sats paid.`;
  box.querySelector('.node').textContent = r.node_id;
  box.querySelector('.verify').textContent = `satstream receipt verify receipt.txt --node-id ${r.node_id}`;
  const file = `${r.signed_text}signature: ${r.signature}\n`;
  box.querySelector('.signed').textContent = file;
  box.querySelector('.copy-receipt').addEventListener('click', (ev) => copy(file, ev.target));
  const check = box.querySelector('.check');
  check.textContent = '…';
  a.el.append(box);
  const c = await checkChunks(r.signed_text, a.chunks, a.el.dataset.state !== 'done');
  check.textContent = (c.ok === true ? '✓ ' : c.ok === false ? '✗ ' : '') + c.text;
  check.className = 'check ' + (c.ok === true ? 'good' : c.ok === false ? 'bad' : '');
  a.el.dataset.receipt = c.ok === true ? 'match' : c.ok === false ? 'mismatch' : 'unchecked';
}

function keepProgress(a) {
  if (!a.session) return;
  try {
    localStorage.setItem(PROGRESS, JSON.stringify({ session: a.session, chunks: a.chunks }));
  } catch (_) {
    // Storage full: the answer is still shown; only a reload would lose it.
  }
}

// A page that closed mid-answer: show what it had shown, and the session's receipt.
function restoreCut() {
  let p = null;
  try {
    p = JSON.parse(localStorage.getItem(PROGRESS) || 'null');
  } catch (_) {
    // Not ours: dropped below.
  }
  localStorage.removeItem(PROGRESS);
  if (!p || typeof p.session !== 'string' || !Array.isArray(p.chunks) || !state.token) return;
  const el = addMessage('assistant', p.chunks.join(''));
  const a = { el, text: el.querySelector('.text'), chunks: p.chunks.map(String), session: p.session, tokens: 0, spent: 0 };
  el.dataset.state = 'cut';
  el.dataset.session = p.session;
  el.dataset.chunks = String(a.chunks.length);
  addNote(el, 'This answer was cut when the page closed. What it showed, and its receipt:');
  laterReceipt(a);
}

// ---- refund ----

async function refund() {
  notice('');
  const bolt11 = $('refund-invoice').value.trim();
  const out = $('refund-status');
  if (!bolt11) {
    out.textContent = 'Paste an invoice of your wallet first.';
    out.className = 'status bad';
    return;
  }
  if (!state.token) {
    out.textContent = 'There is no account in this browser to refund.';
    out.className = 'status bad';
    return;
  }
  $('refund').disabled = true;
  out.textContent = 'Paying it back…';
  out.className = 'status';
  try {
    const r = await api('/v1/account/refund', { method: 'POST', body: JSON.stringify({ bolt11, wait_secs: 30 }) });
    if (r.state === 'succeeded') {
      out.textContent = `Refunded ${sats(r.refunded_msat)} sats.`;
      out.className = 'status good';
      $('refund-invoice').value = '';
    } else if (r.state === 'failed') {
      out.textContent = `The refund failed: ${r.detail || 'no route to your wallet'}. Your balance is unchanged.`;
      out.className = 'status bad';
    } else {
      out.textContent = 'The refund is on its way; your balance shows it once it arrives.';
    }
  } catch (e) {
    out.textContent = e.message;
    out.className = 'status bad';
  }
  $('refund').disabled = false;
  refreshAccount();
}

// ---- wiring ----

function forget() {
  if (!window.confirm('Forget this key? Without it the balance cannot be used or refunded from this browser. Copy it first if you want to keep it.')) return;
  setToken('');
  state.history = [];
}

function newChat() {
  if (state.answer) return;
  state.history = [];
  for (const m of [...$('log').querySelectorAll('.msg')]) m.remove();
  $('empty').hidden = false;
}

document.addEventListener('DOMContentLoaded', () => {
  $('model').addEventListener('change', showPrice);
  $('topup').addEventListener('click', topUp);
  $('copy-invoice').addEventListener('click', (ev) => copy($('invoice').value, ev.target));
  $('webln-pay').addEventListener('click', payWithWallet);
  $('copy-key').addEventListener('click', (ev) => copy(state.token, ev.target));
  $('forget-key').addEventListener('click', forget);
  $('use-key').addEventListener('click', async () => {
    const k = $('key-input').value.trim();
    if (!k) return;
    setToken(k);
    $('key-input').value = '';
    if (await refreshAccount()) notice('Key accepted.', 'info');
  });
  $('send').addEventListener('click', send);
  $('prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) {
      ev.preventDefault();
      send();
    }
  });
  $('stop').addEventListener('click', stop);
  $('new-chat').addEventListener('click', newChat);
  $('refund').addEventListener('click', refund);
  showKey();
  loadModels();
  refreshAccount();
  restoreCut();
  document.body.dataset.ready = '1';
});
