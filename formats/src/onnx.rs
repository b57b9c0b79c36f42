//! ONNX: a protobuf `ModelProto`. Tensor bytes sit in `TensorProto.raw_data`
//! (initializers, and `Constant` node attributes in any nested subgraph), or
//! in sibling files named by `external_data` entries.
//!
//! The wire format is walked by hand because generated protobuf code decodes
//! into owned buffers and never reports where `raw_data` lay in the file,
//! which is the only thing we want; it would also read multi-GiB models
//! whole. Here fields we do not need are stepped over without reading them.

use crate::reader::ByteReader;
use crate::{ExternalSpan, Format, ParseError, Source, TensorSpan};

/// Message nesting limit (model → graph → node → attribute → graph …, so
/// about ten levels of subgraphs). Real models stay far below it; it keeps
/// hostile nesting from exhausting the stack.
const MAX_DEPTH: u32 = 32;

/// `external_data` keys and values are short (a file name, decimal
/// numbers); anything longer is not a real model and is not read into memory.
const MAX_EXTERNAL_STRING: u64 = 64 * 1024;

// Field numbers from onnx.proto3.
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const NODE_ATTRIBUTE: u32 = 5;
const ATTRIBUTE_TENSOR: u32 = 5;
const ATTRIBUTE_GRAPH: u32 = 6;
const ATTRIBUTE_TENSORS: u32 = 10;
const ATTRIBUTE_GRAPHS: u32 = 11;
const TENSOR_RAW_DATA: u32 = 9;
const TENSOR_EXTERNAL_DATA: u32 = 13;
const TENSOR_DATA_LOCATION: u32 = 14;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;

/// `TensorProto.DataLocation.EXTERNAL`.
const DATA_LOCATION_EXTERNAL: u64 = 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WireType {
    Varint,
    Fixed64,
    LengthDelimited,
    Fixed32,
}

pub(crate) fn tensor_spans(
    src: &dyn Source,
) -> Result<(Vec<TensorSpan>, Vec<ExternalSpan>), ParseError> {
    let mut walker = Walker {
        reader: ByteReader::new(src, Format::Onnx),
        tensors: Vec::new(),
        external: Vec::new(),
    };
    let end = walker.reader.file_len();
    walker.model(end)?;
    Ok((walker.tensors, walker.external))
}

struct Walker<'a> {
    reader: ByteReader<'a>,
    tensors: Vec<TensorSpan>,
    external: Vec<ExternalSpan>,
}

impl Walker<'_> {
    fn model(&mut self, end: u64) -> Result<(), ParseError> {
        while let Some((field, wire_type)) = self.next_field(end)? {
            match field {
                MODEL_GRAPH => self.submessage(wire_type, end, 1, Self::graph)?,
                _ => self.skip_field(wire_type, end)?,
            }
        }
        Ok(())
    }

    fn graph(&mut self, end: u64, depth: u32) -> Result<(), ParseError> {
        while let Some((field, wire_type)) = self.next_field(end)? {
            match field {
                GRAPH_NODE => self.submessage(wire_type, end, depth + 1, Self::node)?,
                GRAPH_INITIALIZER => self.submessage(wire_type, end, depth + 1, Self::tensor)?,
                _ => self.skip_field(wire_type, end)?,
            }
        }
        Ok(())
    }

    fn node(&mut self, end: u64, depth: u32) -> Result<(), ParseError> {
        while let Some((field, wire_type)) = self.next_field(end)? {
            match field {
                NODE_ATTRIBUTE => self.submessage(wire_type, end, depth + 1, Self::attribute)?,
                _ => self.skip_field(wire_type, end)?,
            }
        }
        Ok(())
    }

    fn attribute(&mut self, end: u64, depth: u32) -> Result<(), ParseError> {
        while let Some((field, wire_type)) = self.next_field(end)? {
            match field {
                ATTRIBUTE_TENSOR | ATTRIBUTE_TENSORS => {
                    self.submessage(wire_type, end, depth + 1, Self::tensor)?;
                }
                ATTRIBUTE_GRAPH | ATTRIBUTE_GRAPHS => {
                    self.submessage(wire_type, end, depth + 1, Self::graph)?;
                }
                _ => self.skip_field(wire_type, end)?,
            }
        }
        Ok(())
    }

    fn tensor(&mut self, end: u64, _depth: u32) -> Result<(), ParseError> {
        // Protobuf fields may come in any order and a repeated scalar field
        // takes its last value, so collect first and decide at the end.
        let mut raw_data = None;
        let mut data_location = 0;
        let mut entries = Vec::new();
        while let Some((field, wire_type)) = self.next_field(end)? {
            match field {
                TENSOR_RAW_DATA => {
                    let len = self.length(wire_type, end)?;
                    raw_data = Some(TensorSpan {
                        offset: self.reader.position(),
                        len,
                    });
                    self.reader.skip("raw_data", len)?;
                }
                TENSOR_DATA_LOCATION => {
                    expect_wire_type(wire_type, WireType::Varint)?;
                    data_location = self.varint(end)?;
                }
                TENSOR_EXTERNAL_DATA => {
                    let len = self.length(wire_type, end)?;
                    let entry_end = self.reader.position() + len;
                    entries.push(self.string_entry(entry_end)?);
                }
                _ => self.skip_field(wire_type, end)?,
            }
        }
        self.tensors.extend(raw_data);
        if data_location == DATA_LOCATION_EXTERNAL {
            self.external.extend(external_span(entries)?);
        }
        Ok(())
    }

    /// A `StringStringEntryProto` as (key, value).
    fn string_entry(&mut self, end: u64) -> Result<(String, String), ParseError> {
        let mut key = String::new();
        let mut value = String::new();
        while let Some((field, wire_type)) = self.next_field(end)? {
            match field {
                ENTRY_KEY => key = self.short_string(wire_type, end)?,
                ENTRY_VALUE => value = self.short_string(wire_type, end)?,
                _ => self.skip_field(wire_type, end)?,
            }
        }
        Ok((key, value))
    }

    fn short_string(&mut self, wire_type: WireType, end: u64) -> Result<String, ParseError> {
        let len = self.length(wire_type, end)?;
        if len > MAX_EXTERNAL_STRING {
            return Err(malformed(format!(
                "external_data string of {len} bytes exceeds the {MAX_EXTERNAL_STRING}-byte limit"
            )));
        }
        // Bounded by MAX_EXTERNAL_STRING just above.
        let mut bytes = vec![0u8; len as usize];
        self.reader.read_exact("external_data string", &mut bytes)?;
        String::from_utf8(bytes)
            .map_err(|_| malformed("external_data string is not UTF-8".to_string()))
    }

    /// Parse a length-delimited submessage with `parse`, which must consume
    /// exactly its bytes.
    fn submessage(
        &mut self,
        wire_type: WireType,
        end: u64,
        depth: u32,
        parse: fn(&mut Self, u64, u32) -> Result<(), ParseError>,
    ) -> Result<(), ParseError> {
        let len = self.length(wire_type, end)?;
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        // `length` checked that the message fits before `end`.
        let message_end = self.reader.position() + len;
        parse(self, message_end, depth)
    }

    /// The next field's (number, wire type), or `None` at exactly `end`.
    fn next_field(&mut self, end: u64) -> Result<Option<(u32, WireType)>, ParseError> {
        if self.reader.position() == end {
            return Ok(None);
        }
        let tag = self.varint(end)?;
        let wire_type = match tag & 7 {
            0 => WireType::Varint,
            1 => WireType::Fixed64,
            2 => WireType::LengthDelimited,
            5 => WireType::Fixed32,
            // Groups (3, 4) are deprecated and never used by ONNX.
            other => return Err(malformed(format!("unsupported protobuf wire type {other}"))),
        };
        let field = tag >> 3;
        if field == 0 || field > (1 << 29) - 1 {
            return Err(malformed(format!("invalid protobuf field number {field}")));
        }
        // Checked range just above.
        Ok(Some((field as u32, wire_type)))
    }

    fn skip_field(&mut self, wire_type: WireType, end: u64) -> Result<(), ParseError> {
        let len = match wire_type {
            WireType::Varint => {
                self.varint(end)?;
                return Ok(());
            }
            WireType::Fixed64 => 8,
            WireType::Fixed32 => 4,
            WireType::LengthDelimited => self.length(wire_type, end)?,
        };
        self.check_within(len, end)?;
        self.reader.skip("protobuf field", len)
    }

    /// A length prefix whose bytes must fit before `end` (the enclosing
    /// message's end), so no submessage can reach outside its parent.
    fn length(&mut self, wire_type: WireType, end: u64) -> Result<u64, ParseError> {
        expect_wire_type(wire_type, WireType::LengthDelimited)?;
        let len = self.varint(end)?;
        self.check_within(len, end)?;
        Ok(len)
    }

    fn check_within(&self, len: u64, end: u64) -> Result<(), ParseError> {
        let position = self.reader.position();
        match position.checked_add(len) {
            Some(field_end) if field_end <= end => Ok(()),
            _ => Err(malformed(format!(
                "field of {len} bytes at offset {position} runs past its enclosing message ending at {end}"
            ))),
        }
    }

    fn varint(&mut self, end: u64) -> Result<u64, ParseError> {
        let mut value = 0u64;
        for index in 0..10 {
            if self.reader.position() >= end {
                return Err(malformed(format!(
                    "varint runs past its enclosing message ending at {end}"
                )));
            }
            let byte = self.reader.read_u8("varint")?;
            if index == 9 && byte > 1 {
                return Err(malformed("varint overflows 64 bits".to_string()));
            }
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("varint longer than 10 bytes".to_string()))
    }
}

fn external_span(entries: Vec<(String, String)>) -> Result<Option<ExternalSpan>, ParseError> {
    let mut location = None;
    let mut offset = 0;
    let mut len = None;
    for (key, value) in entries {
        match key.as_str() {
            "location" => location = Some(value),
            "offset" => offset = parse_decimal("offset", &value)?,
            "length" => len = Some(parse_decimal("length", &value)?),
            // "checksum" and future keys carry nothing we need.
            _ => {}
        }
    }
    let Some(location) = location.filter(|location| !location.is_empty()) else {
        return Err(malformed("external tensor has no location".to_string()));
    };
    // Without a length the tensor's extent depends on its shape and type;
    // such tensors are rare and simply get no span.
    let Some(len) = len else {
        return Ok(None);
    };
    if offset.checked_add(len).is_none() {
        return Err(malformed(format!(
            "external tensor offset {offset} + length {len} overflows"
        )));
    }
    Ok(Some(ExternalSpan {
        location,
        offset,
        len,
    }))
}

fn parse_decimal(key: &str, value: &str) -> Result<u64, ParseError> {
    value.parse().map_err(|_| {
        malformed(format!(
            "external_data {key} {value:?} is not a non-negative integer"
        ))
    })
}

fn expect_wire_type(actual: WireType, expected: WireType) -> Result<(), ParseError> {
    if actual == expected {
        Ok(())
    } else {
        Err(malformed(format!(
            "field has wire type {actual:?} where {expected:?} is required"
        )))
    }
}

fn too_deep() -> ParseError {
    ParseError::TooDeep {
        format: Format::Onnx,
        limit: MAX_DEPTH,
    }
}

fn malformed(reason: String) -> ParseError {
    ParseError::malformed(Format::Onnx, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect, layout, parse};

    fn varint(mut value: u64, out: &mut Vec<u8>) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn bytes_field(field: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(field) << 3 | 2, &mut out);
        varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn varint_field(field: u32, value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(field) << 3, &mut out);
        varint(value, &mut out);
        out
    }

    fn tensor(name: &str, raw: &[u8]) -> Vec<u8> {
        let mut out = varint_field(1, 4); // dims
        out.extend(varint_field(2, 1)); // data_type FLOAT
        out.extend(bytes_field(8, name.as_bytes()));
        out.extend(bytes_field(9, raw));
        out
    }

    fn external_tensor(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut out = bytes_field(8, b"ext");
        for (key, value) in entries {
            let mut entry = bytes_field(1, key.as_bytes());
            entry.extend(bytes_field(2, value.as_bytes()));
            out.extend(bytes_field(13, &entry));
        }
        out.extend(varint_field(14, 1));
        out
    }

    fn model(graph: &[u8]) -> Vec<u8> {
        let mut out = varint_field(1, 8); // ir_version
        out.extend(bytes_field(2, b"producer"));
        out.extend(bytes_field(7, graph));
        out
    }

    fn constant_node(tensor: &[u8]) -> Vec<u8> {
        let mut attribute = bytes_field(1, b"value");
        attribute.extend(bytes_field(5, tensor));
        attribute.extend(varint_field(20, 4)); // type TENSOR
        let mut node = bytes_field(4, b"Constant");
        node.extend(bytes_field(5, &attribute));
        node
    }

    fn find(haystack: &[u8], needle: &[u8]) -> u64 {
        haystack
            .windows(needle.len())
            .position(|window| window == needle)
            .expect("needle present") as u64
    }

    #[test]
    fn initializers_constants_and_subgraphs() {
        let weight = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let constant = [9u8; 12];
        let nested = [42u8; 20];

        let mut subgraph = bytes_field(1, &constant_node(&tensor("inner", &nested)));
        subgraph.extend(bytes_field(2, b"then_branch"));
        let mut if_attribute = bytes_field(1, b"then_branch");
        if_attribute.extend(bytes_field(6, &subgraph));
        let mut if_node = bytes_field(4, b"If");
        if_node.extend(bytes_field(5, &if_attribute));

        let mut graph = bytes_field(1, &constant_node(&tensor("c", &constant)));
        graph.extend(bytes_field(1, &if_node));
        graph.extend(bytes_field(5, &tensor("w", &weight)));
        graph.extend(bytes_field(5, &tensor("empty", &[])));
        graph.extend(bytes_field(
            5,
            &external_tensor(&[("location", "w.bin"), ("offset", "4096"), ("length", "64")]),
        ));
        graph.extend(bytes_field(
            5,
            &external_tensor(&[("location", "w.bin"), ("length", "8")]),
        ));
        graph.extend(bytes_field(5, &external_tensor(&[("location", "w.bin")])));
        let file = model(&graph);

        assert_eq!(detect("model.onnx", &file), Some(Format::Onnx));
        assert_eq!(detect("model.pb", &file), None);
        let layout = layout("model.onnx", &file).expect("valid").expect("onnx");
        let mut expected = vec![
            TensorSpan {
                offset: find(&file, &constant),
                len: 12,
            },
            TensorSpan {
                offset: find(&file, &nested),
                len: 20,
            },
            TensorSpan {
                offset: find(&file, &weight),
                len: 8,
            },
        ];
        expected.sort_by_key(|span| span.offset);
        assert_eq!(layout.tensors, expected);
        assert_eq!(
            layout.external,
            vec![
                ExternalSpan {
                    location: "w.bin".into(),
                    offset: 4096,
                    len: 64
                },
                ExternalSpan {
                    location: "w.bin".into(),
                    offset: 0,
                    len: 8
                },
            ]
        );
    }

    #[test]
    fn deep_nesting_is_an_error() {
        // graph → node → attribute → graph → … 10,000 levels deep, built
        // inside out.
        let mut graph = Vec::new();
        for _ in 0..10_000 {
            let attribute = bytes_field(6, &graph);
            let node = bytes_field(5, &attribute);
            graph = bytes_field(1, &node);
        }
        let file = model(&graph);
        assert!(matches!(
            parse(Format::Onnx, &file),
            Err(ParseError::TooDeep { .. })
        ));
    }

    #[test]
    fn malformed_protobuf_is_rejected() {
        let good = model(&bytes_field(5, &tensor("w", &[1, 2, 3, 4])));
        assert!(parse(Format::Onnx, &good).is_ok());
        for cut in 0..good.len() {
            // Some prefixes end on a field boundary of the top-level message
            // and are valid (if empty) models; none may panic.
            let _ = parse(Format::Onnx, &good[..cut].to_vec());
        }
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("graph longer than file", {
                let mut out = vec![7 << 3 | 2];
                varint(1 << 60, &mut out);
                out
            }),
            ("raw_data past its tensor", {
                let mut tensor = vec![9 << 3 | 2];
                varint(100, &mut tensor);
                tensor.extend_from_slice(&[0; 100]);
                // The tensor message claims only 5 bytes of that.
                let mut graph = vec![5 << 3 | 2, 5];
                graph.extend_from_slice(&tensor);
                model(&graph)
            }),
            (
                "overlong varint",
                vec![
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
                ],
            ),
            ("group wire type", vec![7 << 3 | 3]),
            ("field zero", vec![0x02, 0x00]),
            ("graph as varint", varint_field(7, 5)),
            (
                "external offset not a number",
                model(&bytes_field(
                    5,
                    &external_tensor(&[("location", "x"), ("offset", "-1"), ("length", "1")]),
                )),
            ),
            (
                "external without location",
                model(&bytes_field(5, &external_tensor(&[("length", "1")]))),
            ),
            (
                "external offset overflow",
                model(&bytes_field(
                    5,
                    &external_tensor(&[
                        ("location", "x"),
                        ("offset", "18446744073709551615"),
                        ("length", "1"),
                    ]),
                )),
            ),
            ("truncated varint", vec![0x08, 0x80]),
        ];
        for (case, file) in cases {
            assert!(
                parse(Format::Onnx, &file).is_err(),
                "{case} should be rejected"
            );
        }
    }

    #[test]
    fn huge_external_string_is_rejected_before_allocation() {
        let mut entry = vec![1 << 3 | 2];
        varint(1 << 40, &mut entry);
        let mut tensor = vec![13 << 3 | 2];
        varint(entry.len() as u64, &mut tensor);
        tensor.extend_from_slice(&entry);
        let file = model(&bytes_field(5, &tensor));
        assert!(parse(Format::Onnx, &file).is_err());
    }
}
