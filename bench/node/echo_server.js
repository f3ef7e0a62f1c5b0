#!/usr/bin/env node
// Reference server for measuring the load generator's own ceiling: Node ws echo (and
// broadcast on a "bench.broadcast" trigger, like the Python servers: the news frame
// carries the trigger's body, see bench/servers/news.py).
//   node echo_server.js PORT      prints "READY <port>"
'use strict';
const WebSocket = require('ws');
const wss = new WebSocket.WebSocketServer({ host: '127.0.0.1', port: +(process.argv[2] || 0),
                                           perMessageDeflate: false, backlog: 4096,
                                           maxPayload: 1 << 20 });
const TRIGGER = Buffer.from('{"subject":"bench.broadcast"');
const TRIGGER_BODY_AT = '{"subject":"bench.broadcast","body":"'.length;
const NEWS = Buffer.from('{"type":"message","subject":"bench.news","body":"');
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (!isBinary && data.length >= TRIGGER.length && data.compare(TRIGGER, 0, TRIGGER.length, 0, TRIGGER.length) === 0) {
      const news = Buffer.concat([NEWS, data.subarray(TRIGGER_BODY_AT)]);
      for (const c of wss.clients) c.send(news, { binary: false });
    } else {
      ws.send(data, { binary: isBinary });
    }
  });
});
wss.on('listening', () => process.stdout.write('READY ' + wss.address().port + '\n'));
