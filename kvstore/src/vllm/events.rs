//! vLLM's KV events (`vllm.distributed.kv_events`), decoded from the msgpack payload of its ZMQ
//! publisher: `[ts, [event, ...], data_parallel_rank]`, each event a map with a `"type"` key
//! (vLLM 0.28 and later) or an array whose first element is the type (earlier versions). Block
//! hashes arrive as integers (the 64-bit form, vLLM's default) or as the raw hash bytes, which
//! are reduced to the same 64-bit form.

use rmpv::Value;

use super::hash::event_hash;

/// One event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks became cached.
    BlockStored {
        /// Their hashes (64-bit form).
        hashes: Vec<u64>,
        /// The hash of the block before the first one, if any.
        parent: Option<u64>,
        /// Tokens per block.
        block_size: Option<u64>,
        /// The LoRA adapter's name, if any.
        lora_name: Option<String>,
        /// Where: "GPU" (the engine's KV cache, also on the CPU backend), "CPU", "STORAGE".
        medium: Option<String>,
    },
    /// Blocks were evicted.
    BlockRemoved {
        /// Their hashes.
        hashes: Vec<u64>,
        /// Where from.
        medium: Option<String>,
    },
    /// The prefix cache was reset: every block is gone.
    AllBlocksCleared,
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventBatch {
    /// When vLLM built it (seconds since the epoch).
    pub ts: f64,
    /// The events in order. Event types this decoder does not know are left out.
    pub events: Vec<KvEvent>,
    /// The data-parallel rank of the engine, if set.
    pub dp_rank: Option<i64>,
}

/// Why a payload is not a batch of vLLM KV events.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Not msgpack.
    #[error("not msgpack: {0}")]
    Msgpack(String),
    /// Msgpack of another shape.
    #[error("not a vLLM KV event batch: {0}")]
    Shape(String),
}

fn shape(what: impl Into<String>) -> EventError {
    EventError::Shape(what.into())
}

fn hash_of(v: &Value) -> Result<u64, EventError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .ok_or_else(|| shape("a block hash out of range")),
        Value::Binary(b) if !b.is_empty() => Ok(event_hash(b)),
        other => Err(shape(format!("a block hash of type {other}"))),
    }
}

fn hashes_of(v: Option<&Value>) -> Result<Vec<u64>, EventError> {
    match v {
        Some(Value::Array(a)) => a.iter().map(hash_of).collect(),
        _ => Err(shape("an event without block_hashes")),
    }
}

fn opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

fn opt_hash(v: Option<&Value>) -> Result<Option<u64>, EventError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => hash_of(v).map(Some),
    }
}

/// Decodes one event from its map or array encoding; `None` for an unknown type.
fn decode_event(v: &Value) -> Result<Option<KvEvent>, EventError> {
    match v {
        Value::Map(fields) => {
            let get = |k: &str| {
                fields
                    .iter()
                    .find(|(key, _)| key.as_str() == Some(k))
                    .map(|(_, v)| v)
            };
            let kind = get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| shape("an event without a type"))?;
            Ok(match kind {
                "BlockStored" => Some(KvEvent::BlockStored {
                    hashes: hashes_of(get("block_hashes"))?,
                    parent: opt_hash(get("parent_block_hash"))?,
                    block_size: get("block_size").and_then(Value::as_u64),
                    lora_name: opt_str(get("lora_name")),
                    medium: opt_str(get("medium")),
                }),
                "BlockRemoved" => Some(KvEvent::BlockRemoved {
                    hashes: hashes_of(get("block_hashes"))?,
                    medium: opt_str(get("medium")),
                }),
                "AllBlocksCleared" => Some(KvEvent::AllBlocksCleared),
                _ => None,
            })
        }
        // [type, fields in declaration order...]
        Value::Array(items) => {
            let kind = items
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| shape("an event without a type"))?;
            Ok(match kind {
                // block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name
                "BlockStored" => Some(KvEvent::BlockStored {
                    hashes: hashes_of(items.get(1))?,
                    parent: opt_hash(items.get(2))?,
                    block_size: items.get(4).and_then(Value::as_u64),
                    lora_name: opt_str(items.get(7)),
                    medium: opt_str(items.get(6)),
                }),
                // block_hashes, medium
                "BlockRemoved" => Some(KvEvent::BlockRemoved {
                    hashes: hashes_of(items.get(1))?,
                    medium: opt_str(items.get(2)),
                }),
                "AllBlocksCleared" => Some(KvEvent::AllBlocksCleared),
                _ => None,
            })
        }
        other => Err(shape(format!("an event of type {other}"))),
    }
}

/// Decodes a payload of vLLM's ZMQ publisher.
pub fn decode_batch(payload: &[u8]) -> Result<KvEventBatch, EventError> {
    let mut rd = payload;
    let value = rmpv::decode::read_value(&mut rd).map_err(|e| EventError::Msgpack(e.to_string()))?;
    if !rd.is_empty() {
        return Err(shape(format!("{} bytes after the batch", rd.len())));
    }
    let Value::Array(fields) = value else {
        return Err(shape("a batch that is not an array"));
    };
    let ts = match fields.first() {
        Some(Value::F64(t)) => *t,
        Some(Value::F32(t)) => f64::from(*t),
        Some(Value::Integer(i)) => i.as_f64().unwrap_or(0.0),
        _ => return Err(shape("a batch without a timestamp")),
    };
    let Some(Value::Array(raw)) = fields.get(1) else {
        return Err(shape("a batch without events"));
    };
    let mut events = Vec::with_capacity(raw.len());
    for e in raw {
        if let Some(e) = decode_event(e)? {
            events.push(e);
        }
    }
    Ok(KvEventBatch {
        ts,
        events,
        dp_rank: fields.get(2).and_then(Value::as_i64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    #[test]
    fn map_encoded_batches_decode() {
        let stored = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (
                s("block_hashes"),
                Value::Array(vec![Value::from(u64::MAX), Value::from(7u64)]),
            ),
            (s("parent_block_hash"), Value::Nil),
            (s("token_ids"), Value::Array(vec![Value::from(1); 4])),
            (s("block_size"), Value::from(2)),
            (s("medium"), s("GPU")),
            (s("lora_name"), Value::Nil),
        ]);
        let removed = Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (
                s("block_hashes"),
                Value::Array(vec![Value::Binary(vec![0xff, 0, 0, 0, 0, 0, 0, 0, 9])]),
            ),
            (s("medium"), s("GPU")),
        ]);
        let cleared = Value::Map(vec![(s("type"), s("AllBlocksCleared"))]);
        let future = Value::Map(vec![(s("type"), s("SomethingNew"))]);
        let batch = Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![stored, removed, cleared, future]),
            Value::from(0),
        ]);
        let b = decode_batch(&encode(&batch)).unwrap();
        assert_eq!(b.ts, 1.5);
        assert_eq!(b.dp_rank, Some(0));
        assert_eq!(
            b.events,
            vec![
                KvEvent::BlockStored {
                    hashes: vec![u64::MAX, 7],
                    parent: None,
                    block_size: Some(2),
                    lora_name: None,
                    medium: Some("GPU".into()),
                },
                KvEvent::BlockRemoved {
                    hashes: vec![9],
                    medium: Some("GPU".into()),
                },
                KvEvent::AllBlocksCleared,
            ]
        );
    }

    #[test]
    fn array_encoded_batches_decode() {
        let stored = Value::Array(vec![
            s("BlockStored"),
            Value::Array(vec![Value::from(3)]),
            Value::from(2),
            Value::Array(vec![Value::from(5); 16]),
            Value::from(16),
            Value::Nil,
            s("CPU"),
            s("adapter"),
        ]);
        let removed = Value::Array(vec![
            s("BlockRemoved"),
            Value::Array(vec![Value::from(3)]),
            Value::Nil,
        ]);
        let batch = Value::Array(vec![Value::F64(2.0), Value::Array(vec![stored, removed])]);
        let b = decode_batch(&encode(&batch)).unwrap();
        assert_eq!(b.dp_rank, None);
        assert_eq!(
            b.events[0],
            KvEvent::BlockStored {
                hashes: vec![3],
                parent: Some(2),
                block_size: Some(16),
                lora_name: Some("adapter".into()),
                medium: Some("CPU".into()),
            }
        );
        assert_eq!(
            b.events[1],
            KvEvent::BlockRemoved {
                hashes: vec![3],
                medium: None
            }
        );
    }

    #[test]
    fn malformed_payloads_are_errors() {
        assert!(
            matches!(decode_batch(b"\x92\xcb"), Err(EventError::Msgpack(_))),
            "truncated"
        );
        assert!(matches!(
            decode_batch(&encode(&Value::from(1))),
            Err(EventError::Shape(_))
        ));
        let no_hashes = Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![Value::Map(vec![(s("type"), s("BlockStored"))])]),
        ]);
        assert!(matches!(
            decode_batch(&encode(&no_hashes)),
            Err(EventError::Shape(_))
        ));
        let mut trailing = encode(&Value::Array(vec![Value::F64(0.0), Value::Array(vec![])]));
        trailing.push(0);
        assert!(matches!(decode_batch(&trailing), Err(EventError::Shape(_))));
    }
}
