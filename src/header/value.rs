//! A value stream as a Rust tree, independent of Python: what `cargo test` round-trips and
//! fuzzes, and a reference decoder for every tag (the binding's decoder must accept exactly
//! what this one accepts).
use super::{ArrayKind, Location, Reader, Tag, Writer};
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Ellipsis,
    Int(i64),
    BigInt(Vec<u8>),
    Float(f64),
    Complex(f64, f64),
    Str(String),
    StrSurrogates(Vec<u8>),
    Bytes(Vec<u8>),
    ByteArray(Vec<u8>),
    BytesPayload {
        bytearray: bool,
        location: Location,
    },
    /// Tuple, List, Set, FrozenSet, TorchSize-free containers of values.
    Sequence(Tag, Vec<Value>),
    /// Dict, OrderedDict, Counter.
    Mapping(Tag, Vec<(Value, Value)>),
    DefaultDict(Box<Value>, Vec<(Value, Value)>),
    Global(String, String),
    NamedTuple(Box<Value>, Vec<Value>),
    Dataclass(Box<Value>, Vec<(String, Value)>),
    Enum(Box<Value>, String),
    Array {
        kind: ArrayKind,
        flags: u8,
        dtype: Box<Value>,
        shape: Vec<u64>,
        location: Location,
    },
    ArrayRef(u64),
    NumpyDtype(Box<Value>),
    NumpyScalar(Box<Value>, Vec<u8>),
    TorchDtype(String),
    TorchDevice(String),
    TorchSize(Vec<i64>),
    /// Slice or Range: start, stop, step.
    Triple(Tag, Box<[Value; 3]>),
    Datetime {
        year: i64,
        fields: [u8; 5],
        micro: u64,
        fold: u8,
        tz: Box<Value>,
    },
    Date {
        year: i64,
        month: u8,
        day: u8,
    },
    Time {
        fields: [u8; 3],
        micro: u64,
        fold: u8,
        tz: Box<Value>,
    },
    Timedelta {
        days: i64,
        seconds: i64,
        micros: i64,
    },
    Timezone(Box<Value>, Box<Value>),
    ZoneInfo(String),
    Decimal(String),
    Uuid([u8; 16]),
    Pickle {
        inline: Option<Vec<u8>>,
        payload: Option<Location>,
        buffers: Vec<Location>,
    },
}

impl Value {
    pub fn encode(&self, out: &mut Writer) {
        match self {
            Value::None => out.tag(Tag::None),
            Value::Bool(false) => out.tag(Tag::False),
            Value::Bool(true) => out.tag(Tag::True),
            Value::Ellipsis => out.tag(Tag::Ellipsis),
            Value::Int(value) => {
                out.tag(Tag::Int);
                out.ivarint(*value);
            }
            Value::BigInt(bytes) => tagged_bytes(out, Tag::BigInt, bytes),
            Value::Float(value) => {
                out.tag(Tag::Float);
                out.f64(*value);
            }
            Value::Complex(real, imaginary) => {
                out.tag(Tag::Complex);
                out.f64(*real);
                out.f64(*imaginary);
            }
            Value::Str(text) => out.str_value(text),
            Value::StrSurrogates(bytes) => tagged_bytes(out, Tag::StrSurrogates, bytes),
            Value::Bytes(bytes) => tagged_bytes(out, Tag::Bytes, bytes),
            Value::ByteArray(bytes) => tagged_bytes(out, Tag::ByteArray, bytes),
            Value::BytesPayload {
                bytearray,
                location,
            } => {
                out.tag(Tag::BytesPayload);
                out.u8(u8::from(*bytearray));
                out.location(*location);
            }
            Value::Sequence(tag, items) => {
                out.tag(*tag);
                items_body(out, items);
            }
            Value::Mapping(tag, pairs) => {
                out.tag(*tag);
                pairs_body(out, pairs);
            }
            Value::DefaultDict(factory, pairs) => {
                out.tag(Tag::DefaultDict);
                factory.encode(out);
                pairs_body(out, pairs);
            }
            Value::Global(module, qualname) => out.global(module, qualname),
            Value::NamedTuple(class, items) => {
                out.tag(Tag::NamedTuple);
                class.encode(out);
                items_body(out, items);
            }
            Value::Dataclass(class, fields) => {
                out.tag(Tag::Dataclass);
                class.encode(out);
                out.uvarint(fields.len() as u64);
                for (name, value) in fields {
                    out.str(name);
                    value.encode(out);
                }
            }
            Value::Enum(class, name) => {
                out.tag(Tag::Enum);
                class.encode(out);
                out.str(name);
            }
            Value::Array {
                kind,
                flags,
                dtype,
                shape,
                location,
            } => {
                out.tag(Tag::Array);
                out.u8(*kind as u8);
                out.u8(*flags);
                dtype.encode(out);
                out.uvarint(shape.len() as u64);
                for dim in shape {
                    out.uvarint(*dim);
                }
                out.location(*location);
            }
            Value::ArrayRef(index) => {
                out.tag(Tag::ArrayRef);
                out.uvarint(*index);
            }
            Value::NumpyDtype(dtype) => {
                out.tag(Tag::NumpyDtype);
                dtype.encode(out);
            }
            Value::NumpyScalar(dtype, bytes) => {
                out.tag(Tag::NumpyScalar);
                dtype.encode(out);
                out.bytes(bytes);
            }
            Value::TorchDtype(name) => {
                out.tag(Tag::TorchDtype);
                out.str(name);
            }
            Value::TorchDevice(name) => {
                out.tag(Tag::TorchDevice);
                out.str(name);
            }
            Value::TorchSize(dims) => {
                out.tag(Tag::TorchSize);
                out.uvarint(dims.len() as u64);
                for dim in dims {
                    out.ivarint(*dim);
                }
            }
            Value::Triple(tag, parts) => {
                out.tag(*tag);
                for part in parts.iter() {
                    part.encode(out);
                }
            }
            Value::Datetime {
                year,
                fields,
                micro,
                fold,
                tz,
            } => {
                out.tag(Tag::Datetime);
                out.ivarint(*year);
                out.raw(fields);
                out.uvarint(*micro);
                out.u8(*fold);
                tz.encode(out);
            }
            Value::Date { year, month, day } => {
                out.tag(Tag::Date);
                out.ivarint(*year);
                out.u8(*month);
                out.u8(*day);
            }
            Value::Time {
                fields,
                micro,
                fold,
                tz,
            } => {
                out.tag(Tag::Time);
                out.raw(fields);
                out.uvarint(*micro);
                out.u8(*fold);
                tz.encode(out);
            }
            Value::Timedelta {
                days,
                seconds,
                micros,
            } => {
                out.tag(Tag::Timedelta);
                out.ivarint(*days);
                out.ivarint(*seconds);
                out.ivarint(*micros);
            }
            Value::Timezone(offset, name) => {
                out.tag(Tag::Timezone);
                offset.encode(out);
                name.encode(out);
            }
            Value::ZoneInfo(key) => {
                out.tag(Tag::ZoneInfo);
                out.str(key);
            }
            Value::Decimal(text) => {
                out.tag(Tag::Decimal);
                out.str(text);
            }
            Value::Uuid(bytes) => {
                out.tag(Tag::Uuid);
                out.raw(bytes);
            }
            Value::Pickle {
                inline,
                payload,
                buffers,
            } => {
                out.tag(Tag::Pickle);
                match (inline, payload) {
                    (_, Some(location)) => {
                        out.u8(1);
                        out.location(*location);
                    }
                    (inline, None) => {
                        out.u8(0);
                        out.bytes(inline.as_deref().unwrap_or_default());
                    }
                }
                out.uvarint(buffers.len() as u64);
                for location in buffers {
                    out.location(*location);
                }
            }
        }
    }

    /// Decodes one value; errors (never panics) on anything malformed.
    pub fn decode(input: &mut Reader<'_>) -> Result<Value> {
        input.enter()?;
        let value = Value::decode_body(input);
        input.leave();
        value
    }

    fn decode_body(input: &mut Reader<'_>) -> Result<Value> {
        let tag = input.tag()?;
        Ok(match tag {
            Tag::None => Value::None,
            Tag::False => Value::Bool(false),
            Tag::True => Value::Bool(true),
            Tag::Ellipsis => Value::Ellipsis,
            Tag::Int => Value::Int(input.ivarint()?),
            Tag::BigInt => Value::BigInt(input.bytes()?.to_vec()),
            Tag::Float => Value::Float(input.f64()?),
            Tag::Complex => Value::Complex(input.f64()?, input.f64()?),
            Tag::Str => Value::Str(input.str()?.to_owned()),
            Tag::StrSurrogates => Value::StrSurrogates(input.bytes()?.to_vec()),
            Tag::Bytes => Value::Bytes(input.bytes()?.to_vec()),
            Tag::ByteArray => Value::ByteArray(input.bytes()?.to_vec()),
            Tag::BytesPayload => Value::BytesPayload {
                bytearray: input.u8()? != 0,
                location: input.location()?,
            },
            Tag::Tuple | Tag::List | Tag::Set | Tag::FrozenSet => {
                Value::Sequence(tag, items(input)?)
            }
            Tag::Dict | Tag::OrderedDict | Tag::Counter => Value::Mapping(tag, pairs(input)?),
            Tag::DefaultDict => Value::DefaultDict(Box::new(Value::decode(input)?), pairs(input)?),
            Tag::Global => Value::Global(input.str()?.to_owned(), input.str()?.to_owned()),
            Tag::NamedTuple => Value::NamedTuple(Box::new(global(input)?), items(input)?),
            Tag::Dataclass => {
                let class = global(input)?;
                let count = input.count(2)?;
                let mut fields = Vec::with_capacity(count);
                for _ in 0..count {
                    fields.push((input.str()?.to_owned(), Value::decode(input)?));
                }
                Value::Dataclass(Box::new(class), fields)
            }
            Tag::Enum => Value::Enum(Box::new(global(input)?), input.str()?.to_owned()),
            Tag::Array => {
                let kind = input.u8()?;
                let kind = ArrayKind::from_byte(kind)
                    .ok_or_else(|| input.error(format_args!("unknown array kind {kind}")))?;
                let flags = input.u8()?;
                let dtype = Box::new(Value::decode(input)?);
                let ndim = input.count(1)?;
                let shape = (0..ndim)
                    .map(|_| input.uvarint())
                    .collect::<Result<Vec<_>>>()?;
                Value::Array {
                    kind,
                    flags,
                    dtype,
                    shape,
                    location: input.location()?,
                }
            }
            Tag::ArrayRef => Value::ArrayRef(input.uvarint()?),
            Tag::NumpyDtype => Value::NumpyDtype(Box::new(Value::decode(input)?)),
            Tag::NumpyScalar => {
                Value::NumpyScalar(Box::new(Value::decode(input)?), input.bytes()?.to_vec())
            }
            Tag::TorchDtype => Value::TorchDtype(input.str()?.to_owned()),
            Tag::TorchDevice => Value::TorchDevice(input.str()?.to_owned()),
            Tag::TorchSize => {
                let count = input.count(1)?;
                Value::TorchSize((0..count).map(|_| input.ivarint()).collect::<Result<_>>()?)
            }
            Tag::Slice | Tag::Range => Value::Triple(
                tag,
                Box::new([
                    Value::decode(input)?,
                    Value::decode(input)?,
                    Value::decode(input)?,
                ]),
            ),
            Tag::Datetime => Value::Datetime {
                year: input.ivarint()?,
                fields: input.take(5)?.try_into().expect("5 bytes"),
                micro: input.uvarint()?,
                fold: input.u8()?,
                tz: Box::new(Value::decode(input)?),
            },
            Tag::Date => Value::Date {
                year: input.ivarint()?,
                month: input.u8()?,
                day: input.u8()?,
            },
            Tag::Time => Value::Time {
                fields: input.take(3)?.try_into().expect("3 bytes"),
                micro: input.uvarint()?,
                fold: input.u8()?,
                tz: Box::new(Value::decode(input)?),
            },
            Tag::Timedelta => Value::Timedelta {
                days: input.ivarint()?,
                seconds: input.ivarint()?,
                micros: input.ivarint()?,
            },
            Tag::Timezone => Value::Timezone(
                Box::new(Value::decode(input)?),
                Box::new(Value::decode(input)?),
            ),
            Tag::ZoneInfo => Value::ZoneInfo(input.str()?.to_owned()),
            Tag::Decimal => Value::Decimal(input.str()?.to_owned()),
            Tag::Uuid => Value::Uuid(input.take(16)?.try_into().expect("16 bytes")),
            Tag::Pickle => {
                let (inline, payload) = match input.u8()? {
                    0 => (Some(input.bytes()?.to_vec()), None),
                    1 => (None, Some(input.location()?)),
                    other => {
                        return Err(input.error(format_args!("unknown pickle storage {other}")))
                    }
                };
                let count = input.count(3)?;
                let buffers = (0..count)
                    .map(|_| input.location())
                    .collect::<Result<_>>()?;
                Value::Pickle {
                    inline,
                    payload,
                    buffers,
                }
            }
        })
    }
}

fn tagged_bytes(out: &mut Writer, tag: Tag, bytes: &[u8]) {
    out.tag(tag);
    out.bytes(bytes);
}

fn items_body(out: &mut Writer, items: &[Value]) {
    out.uvarint(items.len() as u64);
    for item in items {
        item.encode(out);
    }
}

fn pairs_body(out: &mut Writer, pairs: &[(Value, Value)]) {
    out.uvarint(pairs.len() as u64);
    for (key, value) in pairs {
        key.encode(out);
        value.encode(out);
    }
}

fn items(input: &mut Reader<'_>) -> Result<Vec<Value>> {
    let count = input.count(1)?;
    (0..count).map(|_| Value::decode(input)).collect()
}

fn pairs(input: &mut Reader<'_>) -> Result<Vec<(Value, Value)>> {
    let count = input.count(2)?;
    (0..count)
        .map(|_| Ok((Value::decode(input)?, Value::decode(input)?)))
        .collect()
}

fn global(input: &mut Reader<'_>) -> Result<Value> {
    let (module, qualname) = input.global()?;
    Ok(Value::Global(module.to_owned(), qualname.to_owned()))
}
