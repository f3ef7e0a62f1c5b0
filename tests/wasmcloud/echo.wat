;; Tiny wasmcloud:messaging@0.2.0 test component, written directly against the canonical ABI.
;; Built at test time by tests/wasmhost.py:
;;   wasm-tools parse echo.wat -o core.wasm
;;   wasm-tools component embed wit --world echo core.wasm -o embedded.wasm
;;   wasm-tools component new embedded.wasm -o echo.wasm
;;
;; handle-message(msg):
;;   1. if msg.body is "to:<subject>:<text>", publish <text> to <subject> (no reply-to);
;;   2. then, if msg.reply-to is set, publish "echo: " + body to reply-to.
;; Step 1 happens first, so a requester that gets the echo knows the "to:" publish was
;; already sent on the host's (single) NATS connection.
;; It returns result::ok even when a publish fails (a failed publish traps in the host anyway).
;;
;; Memory layout: [16,22) "echo: "; [32,44) handle-message return area;
;; [48,60) publish return area; heap from 1024 (bump allocator, reset after each call;
;; the host makes a fresh instance per message anyway).
(module
  ;; publish(subject ptr,len, body ptr,len, reply-to disc,ptr,len, retptr)
  (import "wasmcloud:messaging/consumer@0.2.0" "publish"
    (func $publish (param i32 i32 i32 i32 i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (data (i32.const 16) "echo: ")

  (func $alloc (param $align i32) (param $size i32) (result i32)
    (local $p i32)
    (local $have i32)
    (local.set $p
      (i32.and
        (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
        (i32.xor (i32.sub (local.get $align) (i32.const 1)) (i32.const -1))))
    (global.set $heap (i32.add (local.get $p) (local.get $size)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (global.get $heap) (local.get $have))
      (then
        (if (i32.eq (i32.const -1)
              (memory.grow
                (i32.add
                  (i32.div_u (i32.sub (global.get $heap) (local.get $have)) (i32.const 65536))
                  (i32.const 1))))
          (then unreachable))))
    (local.get $p))

  (func (export "cabi_realloc")
    (param $old i32) (param $old_size i32) (param $align i32) (param $new_size i32) (result i32)
    (local $p i32)
    (local.set $p (call $alloc (local.get $align) (local.get $new_size)))
    (if (local.get $old)
      (then (memory.copy (local.get $p) (local.get $old)
              (select (local.get $old_size) (local.get $new_size)
                (i32.lt_u (local.get $old_size) (local.get $new_size))))))
    (local.get $p))

  ;; If body = "to:<subject>:<text>", publish <text> to <subject>.
  (func $forward (param $body_ptr i32) (param $body_len i32)
    (local $i i32)
    (if (i32.lt_u (local.get $body_len) (i32.const 4)) (then return))
    (if (i32.ne (i32.load8_u (local.get $body_ptr)) (i32.const 116)) (then return))   ;; 't'
    (if (i32.ne (i32.load8_u offset=1 (local.get $body_ptr)) (i32.const 111)) (then return)) ;; 'o'
    (if (i32.ne (i32.load8_u offset=2 (local.get $body_ptr)) (i32.const 58)) (then return))  ;; ':'
    (local.set $i (i32.const 3))
    (block $found
      (loop $scan
        (if (i32.ge_u (local.get $i) (local.get $body_len)) (then return))  ;; no second ':'
        (br_if $found (i32.eq (i32.load8_u (i32.add (local.get $body_ptr) (local.get $i)))
                              (i32.const 58)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    (if (i32.eq (local.get $i) (i32.const 3)) (then return))                 ;; empty subject
    (call $publish
      (i32.add (local.get $body_ptr) (i32.const 3))
      (i32.sub (local.get $i) (i32.const 3))
      (i32.add (local.get $body_ptr) (i32.add (local.get $i) (i32.const 1)))
      (i32.sub (local.get $body_len) (i32.add (local.get $i) (i32.const 1)))
      (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 48)))

  (func (export "wasmcloud:messaging/handler@0.2.0#handle-message")
    (param $subj_ptr i32) (param $subj_len i32)
    (param $body_ptr i32) (param $body_len i32)
    (param $rt_disc i32) (param $rt_ptr i32) (param $rt_len i32)
    (result i32)
    (local $out i32)
    (call $forward (local.get $body_ptr) (local.get $body_len))
    (if (local.get $rt_disc)
      (then
        (local.set $out (call $alloc (i32.const 1) (i32.add (local.get $body_len) (i32.const 6))))
        (memory.copy (local.get $out) (i32.const 16) (i32.const 6))
        (memory.copy (i32.add (local.get $out) (i32.const 6)) (local.get $body_ptr) (local.get $body_len))
        (call $publish
          (local.get $rt_ptr) (local.get $rt_len)
          (local.get $out) (i32.add (local.get $body_len) (i32.const 6))
          (i32.const 0) (i32.const 0) (i32.const 0)
          (i32.const 48))))
    (i32.store8 (i32.const 32) (i32.const 0))   ;; result::ok
    (global.set $heap (i32.const 1024))
    (i32.const 32))
)
