// An independent WebSocket peer (Node's `ws`) driven by the trial suite.
// Usage: node peer.js <url> <subprotocol|-> <frames.json>
// Sends the steps of the JSON array one at a time: the first after the welcome frame, each
// next one after the answer to the previous; every step must get exactly one answer.
// Prints every frame received as one JSON line, then closes with 1000.
const WebSocket = require("ws");
const [url, subprotocol, script] = process.argv.slice(2);
const steps = JSON.parse(script);
const ws = subprotocol === "-" ? new WebSocket(url) : new WebSocket(url, subprotocol);
let step = 0;
const deadline = setTimeout(() => { console.error("peer.js: timed out"); process.exit(3); }, 10000);

function sendNext() {
  if (step >= steps.length) { clearTimeout(deadline); ws.close(1000); return; }
  const s = steps[step++];
  if (s.binary_hex !== undefined) ws.send(Buffer.from(s.binary_hex, "hex"), { binary: true });
  else if (s.text !== undefined) ws.send(s.text);
  else ws.send(JSON.stringify(s.frame));
}

ws.on("message", (data, isBinary) => {
  const text = data.toString("utf8");
  console.log(JSON.stringify({ binary: isBinary, data: text, protocol: ws.protocol }));
  sendNext();
});
ws.on("close", (code) => { console.log(JSON.stringify({ closed: code })); process.exit(0); });
ws.on("error", (err) => { console.error("peer.js: " + err.message); process.exit(2); });
