/** A new in-memory crsqlite-wasm database under Node. */
export function openNodeDatabase(): Promise<import("@vlcn.io/crsqlite-wasm").DB>;
