// Alby's L402 client (@getalby/lightning-tools, fetchWithL402) against satstream's HTTP face,
// run by tests/integration/http.rs. Its wallet pays through the test's payer node: it writes
// `PAY <invoice>` on stdout and reads the preimage from stdin.
// argv: <node modules dir> <url> <JSON body>. Prints JSON lines: the paid response (status,
// time to pay, time to the first token), then a second request on the same credential.
import { createRequire } from "node:module";
import * as readline from "node:readline";

const [dir, url, body] = process.argv.slice(2);
const require = createRequire(dir + "/package.json");
const { fetchWithL402 } = require("@getalby/lightning-tools/402/l402");

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const t0 = performance.now();
let paidAt = null;
let challengedAt = null;
const wallet = {
  async payInvoice({ invoice }) {
    challengedAt = performance.now();
    process.stdout.write(`PAY ${invoice}\n`);
    const { value } = await lines.next();
    paidAt = performance.now();
    return { preimage: value.trim() };
  },
};
const args = () => ({ method: "POST", headers: { "content-type": "application/json" }, body });

async function read(resp) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let text = "";
  let first = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    const s = dec.decode(value, { stream: true });
    if (first === null && s.includes('"content":"') && !s.includes('"content":""')) first = performance.now();
    text += s;
  }
  return { text, first };
}

const resp = await fetchWithL402(url, args(), { wallet });
const { text, first } = await read(resp);
console.log(JSON.stringify({
  case: "paid",
  status: resp.status,
  paid: resp.payment?.paid ?? false,
  session: resp.headers.get("x-satstream-session-id"),
  challenge_ms: challengedAt - t0,
  pay_ms: paidAt - challengedAt,
  first_token_after_paid_ms: first === null ? null : first - paidAt,
  body: text,
}));
// The credential speaks for the account on later requests too, without paying again.
const again = await fetchWithL402(url, args(), { wallet, credentials: resp.payment.credentials });
const second = await read(again);
console.log(JSON.stringify({ case: "again", status: again.status, body: second.text }));
process.exit(0);
