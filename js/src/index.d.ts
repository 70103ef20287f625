// Types of @tenantsync/client (docs/JS-CLIENT.md).

/** A crsqlite-wasm database (`DB` of @vlcn.io/crsqlite-wasm 0.16). */
export type Database = import("@vlcn.io/crsqlite-wasm").DB;

export type State = "connecting" | "syncing" | "live" | "offline" | "closed";

export interface Status {
  state: State;
  /** Rows with quarantined local changes (refused, or evicted before a push). */
  quarantined: number;
  /** Pushes refused in this session. */
  refused: number;
  /** The last error the server or the client named. */
  error: string | null;
  /** The server schema version the replica has (0: none yet). */
  schemaVersion: number;
}

export interface Quarantined {
  id: number;
  table: string;
  /** The packed primary key, hex. */
  pk: string;
  /** The column, or "-1" for the row's create/delete record. */
  cid: string;
  value: unknown;
  /** "push_refused" or "evicted". */
  reason: string;
  code: string | null;
  detail: string;
  /** Milliseconds since 1970. */
  at: number;
}

export interface ClientOptions {
  /** The server's base URL, e.g. "https://sync.example.com". */
  url: string;
  /** A token, or a function giving one (called at every connect, so an expired token is replaced). */
  token: string | (() => string | Promise<string>);
  db: Database;
  /** The schema script, run once on a new replica (omitted: the server's
   * current schema comes with the first `welcome`). */
  schema?: string;
  /** The server schema version `schema` is (default 1): a replica behind
   * the server's migrates in place (docs/PROTOCOL.md §5.4). */
  schemaVersion?: number;
  /** Subscriptions by id: `SELECT * FROM <table> [WHERE ...]`. */
  subscriptions?: Record<string, string>;
  /** A WebSocket constructor (default: the global one, else the `ws` package). */
  WebSocket?: unknown;
  backoff?: { minMs?: number; maxMs?: number };
  /** Connect at once (default true). */
  connect?: boolean;
}

export class TenantSyncClient {
  static open(options: ClientOptions): Promise<TenantSyncClient>;
  readonly db: Database;
  readonly siteId: string;
  /** Per subscription, the mode of its last initial sync. */
  readonly modes: Map<string, "snapshot" | "resume" | "refetch">;
  readonly status: Status;
  onStatus(cb: (s: Status) => void): () => void;
  until(pred: (s: Status) => boolean): Promise<Status>;
  subscribe(id: string, query: string): Promise<void>;
  /** Ends a subscription; rows no other subscription holds leave the replica. */
  unsubscribe(id: string): Promise<void>;
  subscriptions(): Promise<{ id: string; query: string; cursor: number | null }[]>;
  liveQuery<T = Record<string, unknown>>(sql: string, params: unknown[], cb: (rows: T[]) => void): () => void;
  quarantine(): Promise<Quarantined[]>;
  discardQuarantined(ids: number[]): Promise<void>;
  pushedVersion(): Promise<number>;
  connect(): void;
  disconnect(): void;
  close(): void;
}

/** Opens (creating) a database persisted in IndexedDB (browsers). */
export function openDatabase(name: string, wasmUrl?: string): Promise<Database>;

/** A REAL value, kept apart from integers even when integral. */
export class Real {
  constructor(value: number);
  value: number;
}
/** The protocol's JSON: integers as BigInt, other numbers as Real. */
export function parse(text: string): unknown;
export function stringify(value: unknown): string;
