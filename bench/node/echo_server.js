#!/usr/bin/env node
// Reference server for measuring the load generator's own ceiling: Node ws echo (and
// broadcast on a "bench.broadcast" trigger, like the Python servers).
//   node echo_server.js PORT NEWS      prints "READY <port>"; NEWS is the broadcast frame
'use strict';
const WebSocket = require('ws');
const wss = new WebSocket.WebSocketServer({ host: '127.0.0.1', port: +(process.argv[2] || 0),
                                           perMessageDeflate: false, backlog: 4096 });
const TRIGGER = Buffer.from('{"subject":"bench.broadcast"');
const NEWS = Buffer.from(process.argv[3] || '{}');
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (data.length >= TRIGGER.length && data.compare(TRIGGER, 0, TRIGGER.length, 0, TRIGGER.length) === 0) {
      for (const c of wss.clients) c.send(NEWS, { binary: false });
    } else {
      ws.send(data, { binary: isBinary });
    }
  });
});
wss.on('listening', () => process.stdout.write('READY ' + wss.address().port + '\n'));
