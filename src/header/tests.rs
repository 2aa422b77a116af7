use super::value::Value;
use super::*;
use proptest::prelude::*;

fn location() -> impl Strategy<Value = Location> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(block, offset, nbytes)| Location {
        block,
        offset,
        nbytes,
    })
}

fn global() -> impl Strategy<Value = Value> {
    ("[a-z_.]{1,12}", "[A-Za-z_.]{1,12}").prop_map(|(module, name)| Value::Global(module, name))
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Ellipsis),
        any::<i64>().prop_map(Value::Int),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(Value::BigInt),
        any::<u64>().prop_map(|bits| Value::Float(f64::from_bits(bits))),
        (any::<f64>(), any::<f64>()).prop_map(|(re, im)| Value::Complex(re, im)),
        ".{0,20}".prop_map(Value::Str),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Value::ByteArray),
        (any::<bool>(), location()).prop_map(|(bytearray, location)| Value::BytesPayload {
            bytearray,
            location
        }),
        global(),
        any::<u64>().prop_map(Value::ArrayRef),
        "[a-z0-9]{1,10}".prop_map(Value::TorchDtype),
        prop::collection::vec(any::<i64>(), 0..6).prop_map(Value::TorchSize),
        (any::<i64>(), any::<u8>(), any::<u8>()).prop_map(|(year, month, day)| Value::Date {
            year,
            month,
            day
        }),
        (any::<i64>(), any::<i64>(), any::<i64>()).prop_map(|(days, seconds, micros)| {
            Value::Timedelta {
                days,
                seconds,
                micros,
            }
        }),
        "[A-Za-z/_]{1,20}".prop_map(Value::ZoneInfo),
        any::<[u8; 16]>().prop_map(Value::Uuid),
        (
            prop::option::of(prop::collection::vec(any::<u8>(), 0..30)),
            prop::collection::vec(location(), 0..3)
        )
            .prop_map(|(inline, buffers)| {
                let payload = inline.is_none().then_some(Location {
                    block: 0,
                    offset: 64,
                    nbytes: 9,
                });
                Value::Pickle {
                    inline: inline.or(payload.is_none().then(Vec::new)),
                    payload,
                    buffers,
                }
            }),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 64, 6, |inner| {
        let sequence_tag = prop_oneof![
            Just(Tag::Tuple),
            Just(Tag::List),
            Just(Tag::Set),
            Just(Tag::FrozenSet)
        ];
        let mapping_tag = prop_oneof![Just(Tag::Dict), Just(Tag::OrderedDict), Just(Tag::Counter)];
        prop_oneof![
            (sequence_tag, prop::collection::vec(inner.clone(), 0..6))
                .prop_map(|(tag, items)| Value::Sequence(tag, items)),
            (
                mapping_tag,
                prop::collection::vec((inner.clone(), inner.clone()), 0..4)
            )
                .prop_map(|(tag, pairs)| Value::Mapping(tag, pairs)),
            (
                global(),
                prop::collection::vec((inner.clone(), inner.clone()), 0..3)
            )
                .prop_map(|(factory, pairs)| Value::DefaultDict(Box::new(factory), pairs)),
            (global(), prop::collection::vec(inner.clone(), 0..4))
                .prop_map(|(class, items)| Value::NamedTuple(Box::new(class), items)),
            (
                global(),
                prop::collection::vec(("[a-z]{1,8}", inner.clone()), 0..4)
            )
                .prop_map(|(class, fields)| Value::Dataclass(Box::new(class), fields)),
            (global(), "[A-Z]{1,8}").prop_map(|(class, name)| Value::Enum(Box::new(class), name)),
            (
                inner.clone(),
                prop::collection::vec(any::<u64>(), 0..4),
                location(),
                any::<u8>()
            )
                .prop_map(|(dtype, shape, location, flags)| Value::Array {
                    kind: ArrayKind::Torch,
                    flags,
                    dtype: Box::new(dtype),
                    shape,
                    location
                }),
            inner
                .clone()
                .prop_map(|dtype| Value::NumpyDtype(Box::new(dtype))),
            (inner.clone(), prop::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(dtype, bytes)| Value::NumpyScalar(Box::new(dtype), bytes)),
            (
                prop_oneof![Just(Tag::Slice), Just(Tag::Range)],
                inner.clone(),
                inner.clone(),
                inner.clone()
            )
                .prop_map(|(tag, a, b, c)| Value::Triple(tag, Box::new([a, b, c]))),
            (
                any::<i64>(),
                any::<[u8; 5]>(),
                any::<u64>(),
                any::<u8>(),
                inner.clone()
            )
                .prop_map(|(year, fields, micro, fold, tz)| Value::Datetime {
                    year,
                    fields,
                    micro,
                    fold,
                    tz: Box::new(tz)
                }),
            (any::<[u8; 3]>(), any::<u64>(), any::<u8>(), inner.clone()).prop_map(
                |(fields, micro, fold, tz)| Value::Time {
                    fields,
                    micro,
                    fold,
                    tz: Box::new(tz)
                }
            ),
            (inner.clone(), inner)
                .prop_map(|(offset, name)| Value::Timezone(Box::new(offset), Box::new(name))),
        ]
    })
}

/// Floats compare by bits (NaN payloads and -0.0 must survive).
fn same(a: &Value, b: &Value) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn encoded(value: &Value) -> Vec<u8> {
    let mut out = Writer::new();
    value.encode(&mut out);
    out.as_bytes().to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn values_round_trip(value in value()) {
        let bytes = encoded(&value);
        let mut input = Reader::new(&bytes);
        let decoded = Value::decode(&mut input).unwrap();
        prop_assert!(input.is_at_end());
        prop_assert!(same(&decoded, &value), "{decoded:?} != {value:?}");
    }

    #[test]
    fn every_truncation_is_an_error(value in value()) {
        let bytes = encoded(&value);
        for cut in 0..bytes.len() {
            let mut input = Reader::new(&bytes[..cut]);
            prop_assert!(Value::decode(&mut input).is_err(), "cut at {cut} of {}", bytes.len());
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut input = Reader::new(&bytes);
        let _ = Value::decode(&mut input);
        let _ = FrameHeader::read(&bytes);
    }

    #[test]
    fn varints_round_trip(unsigned in any::<u64>(), signed in any::<i64>()) {
        let mut out = Writer::new();
        out.uvarint(unsigned);
        out.ivarint(signed);
        let mut input = Reader::new(out.as_bytes());
        prop_assert_eq!(input.uvarint().unwrap(), unsigned);
        prop_assert_eq!(input.ivarint().unwrap(), signed);
    }
}

#[test]
fn deep_nesting_is_refused_not_recursed() {
    // Unoptimised test builds use far bigger frames than the release binding, so give the
    // reference decoder room for its 128 levels; what matters is that 100,000 are refused.
    let decoded = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            let mut bytes = [Tag::List as u8, 1].repeat(100_000);
            bytes.push(Tag::None as u8);
            Value::decode(&mut Reader::new(&bytes)).map(|_| ())
        })
        .unwrap()
        .join()
        .unwrap();
    let error = decoded.unwrap_err();
    assert!(error.to_string().contains("nested deeper"), "{error}");
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    let mut out = Writer::new();
    out.tag(Tag::List);
    out.uvarint(u64::MAX / 2);
    let error = Value::decode(&mut Reader::new(out.as_bytes())).unwrap_err();
    assert!(error.to_string().contains("cannot fit"), "{error}");
}

#[test]
fn varint_overflow_is_an_error() {
    let bytes = [0xff; 11];
    assert!(Reader::new(&bytes).uvarint().is_err());
    let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
    assert!(Reader::new(&bytes).uvarint().is_err());
}

#[test]
fn frame_prefix_round_trips_and_checks_bounds() {
    let header = FrameHeader::new(FLAG_PICKLE, 10, 2, 128).unwrap();
    assert_eq!(header.payload_offset, 64);
    let mut frame = vec![0u8; header.frame_len as usize];
    frame[..PREFIX_LEN].copy_from_slice(&header.to_bytes());
    assert_eq!(FrameHeader::read(&frame).unwrap(), header);
    assert!(FrameHeader::read(&frame[..frame.len() - 1])
        .unwrap_err()
        .to_string()
        .contains("truncated"));
    let mut wrong_version = frame.clone();
    wrong_version[4] = 9;
    assert!(FrameHeader::read(&wrong_version)
        .unwrap_err()
        .to_string()
        .contains("version 9"));
    let mut bad_offset = frame.clone();
    bad_offset[16] = 8;
    assert!(FrameHeader::read(&bad_offset).is_err());
}

#[test]
fn payload_ranges_are_bounds_checked() {
    let inside = Location {
        block: 0,
        offset: 64,
        nbytes: 64,
    };
    assert_eq!(payload_range(inside, 128).unwrap(), 64..128);
    assert!(payload_range(
        Location {
            nbytes: 65,
            ..inside
        },
        128
    )
    .is_err());
    assert!(payload_range(
        Location {
            block: 0,
            offset: u64::MAX,
            nbytes: 2
        },
        128
    )
    .is_err());
}

#[test]
fn fixed_width_varints_read_back_and_patch_in_place() {
    for value in [0u64, 1, 127, 128, 1 << 40, u64::MAX] {
        let mut out = Writer::new();
        out.tag(Tag::None);
        let at = out.uvarint_fixed(12345);
        out.tag(Tag::True);
        out.patch_uvarint_fixed(at, value);
        assert_eq!(out.len(), 2 + FIXED_VARINT_LEN);
        let mut input = Reader::new(out.as_bytes());
        input.tag().unwrap();
        assert_eq!(input.uvarint().unwrap(), value);
        assert_eq!(input.tag().unwrap(), Tag::True);
    }
}

/// Lengths from empty to past every limit the frame has (`u32` stream, `isize` frame).
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..200,
        (0u32..64).prop_map(|bits| 1usize << bits),
        (0u32..64).prop_map(|bits| (1usize << bits) - 1),
        Just(u32::MAX as usize),
        Just(MAX_BYTES),
        Just(usize::MAX),
        any::<usize>(),
    ]
}

proptest! {
    #[test]
    fn frame_lengths_are_exact_or_refused(
        header_len in length(),
        array_count in length(),
        payload_len in length(),
    ) {
        // The layout in u128, where nothing overflows.
        let payload_offset = (PREFIX_LEN as u128 + header_len as u128).div_ceil(64) * 64;
        let frame_len = payload_offset + payload_len as u128;
        let fits = header_len as u128 <= u32::MAX as u128
            && array_count as u128 <= u32::MAX as u128
            && frame_len <= MAX_BYTES as u128;
        match FrameHeader::new(0, header_len, array_count, payload_len) {
            None => prop_assert!(!fits),
            Some(header) => {
                prop_assert!(fits);
                prop_assert_eq!(header.payload_offset as u128, payload_offset);
                prop_assert_eq!(header.frame_len as u128, frame_len);
                prop_assert_eq!(header.payload_len() as u128, payload_len as u128);
                prop_assert!(header.payload_offset as usize >= PREFIX_LEN + header_len);
            }
        }
    }
}
