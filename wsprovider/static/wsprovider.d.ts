// Types of wsprovider.js, the browser client of wsprovider (docs/browser.rst).

export const JSON_PROTOCOL: "wsprovider.v1.json";
export const MSGPACK_PROTOCOL: "wsprovider.v1.msgpack";
export const VERSION: string;

/** What a body may be given as; it is always received as a Uint8Array. */
export type Body = string | Uint8Array | ArrayBuffer | ArrayBufferView | null | undefined | object;

export type State = "connecting" | "open" | "reconnecting" | "closed";

export interface Session {
  /** The session's unguessable id. */
  id: string;
  /** The session's address: what others publish to, to reach it. */
  replyTo: string;
  protocol: string;
  maxMessageSize: number;
}

export interface Options {
  /** Sent as ?token= (AUTH_TOKEN / AUTH_TOKENS / a JWT); a function is asked on every connect. */
  token?: string | (() => string);
  /** Subprotocol: "json" (text frames, the default) or "msgpack" (binary frames). */
  protocol?: "json" | "msgpack";
  /** Path used when no URL is given (default "/ws"). */
  path?: string;
  /** Default timeout of request() in ms (default 5000). */
  requestTimeout?: number;
  /** Reconnect after the connection drops (default true). */
  reconnect?: boolean;
  /** Backoff base in ms (default 500): attempt n waits random() * min(maxDelay, minDelay * 2^n). */
  minDelay?: number;
  /** Backoff cap in ms (default 30000). */
  maxDelay?: number;
  /** Consecutive failed attempts before giving up (state "closed"); default Infinity. */
  maxAttempts?: number;
  /** A connection open this long (ms, default 5000) resets the backoff. */
  stableAfter?: number;
  /** Frames held while not connected (default 1000); beyond it publish() throws buffer_full. */
  maxQueued?: number;
  /** A WebSocket constructor (default globalThis.WebSocket). */
  WebSocket?: unknown;
}

export class WsproviderError extends Error {
  /** The protocol's error code (docs/protocol.rst), or "timeout", "not_connected", "buffer_full". */
  code: string;
  /** The error frame, when the service sent one. */
  frame?: Record<string, unknown>;
}

export class Message {
  subject: string;
  body: Uint8Array;
  replyTo: string | null;
  /** The body as UTF-8 text. */
  readonly text: string;
  json(): unknown;
  /** Publish an answer to replyTo. */
  respond(body: Body): void;
}

export interface Subscription {
  pattern: string;
  /** Resolves once the service has the subscription live; rejects if it is refused. */
  ready: Promise<void>;
  unsubscribe(): void;
}

export interface Events {
  state: { state: State; previous: State };
  welcome: Session;
  message: Message;
  error: WsproviderError;
  /** A subscription is live at the service (again after every reconnect). */
  subscribed: string;
  close: { code: number; reason: string; willReconnect: boolean };
}

export class Client {
  constructor(url?: string, options?: Options);
  readonly url: string;
  readonly state: State;
  /** The current session (a new one after every reconnect), or null before the first welcome. */
  readonly session: Session | null;
  readonly attempts: number;
  on<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): () => void;
  off<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): void;
  ready(): Promise<Session>;
  publish(subject: string, body?: Body, options?: { replyTo?: string }): void;
  subscribe(pattern: string, callback: (message: Message) => void, options?: { queue?: string }): Subscription;
  request(subject: string, body?: Body, options?: { timeout?: number }): Promise<Message>;
  ping(options?: { timeout?: number }): Promise<unknown>;
  close(code?: number, reason?: string): Promise<void>;
}

export function connect(url?: string, options?: Options): Client;
export function connect(options: Options): Client;
export default connect;

export function subjectMatches(pattern: string, subject: string): boolean;
export function toBytes(body: Body): Uint8Array;
export function base64Encode(bytes: Uint8Array): string;
export function base64Decode(text: string): Uint8Array;
export function backoffDelay(attempt: number, minDelay: number, maxDelay: number, random?: () => number): number;
export function defaultUrl(path?: string): string;
export const msgpack: { encode(value: unknown): Uint8Array; decode(bytes: Uint8Array | ArrayBuffer): unknown };
