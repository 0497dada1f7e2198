//! The gRPC codecs. `tandem.v1.Cluster`'s messages are the contract's serde types themselves
//! (`crate::contract`), written as JSON inside gRPC frames: this is the only place those types
//! are encoded for the wire, so no caller builds or parses them by hand. The other services'
//! are protobuf, through [`ProtoCodec`].

use std::marker::PhantomData;

use prost::bytes::{Buf, BufMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Encodes `T`, decodes `U`.
pub struct SerdeCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SerdeCodec<T, U> {
    fn default() -> Self {
        SerdeCodec(PhantomData)
    }
}

pub struct SerdeEncoder<T>(PhantomData<T>);
pub struct SerdeDecoder<U>(PhantomData<U>);

impl<T: Serialize> Encoder for SerdeEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        serde_json::to_writer(dst.writer(), &item).map_err(|e| Status::internal(format!("encoding: {e}")))
    }
}

impl<U: DeserializeOwned> Decoder for SerdeDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let item = serde_json::from_reader(src.reader())
            .map_err(|e| Status::invalid_argument(format!("malformed {}: {e}", std::any::type_name::<U>())))?;
        Ok(Some(item))
    }
}

impl<T, U> Codec for SerdeCodec<T, U>
where
    T: Serialize + Send + 'static,
    U: DeserializeOwned + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SerdeEncoder<T>;
    type Decoder = SerdeDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SerdeEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        SerdeDecoder(PhantomData)
    }
}

/// The codec of the protobuf services (`Raft`, `Worker`, `Api`, health): prost's, except that a
/// request which does not decode is the caller's error (`InvalidArgument`) rather than the
/// server's (`Internal`, as tonic answers it).
pub struct ProtoCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        ProtoCodec(PhantomData)
    }
}

pub struct ProtoDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed {}: {e}", std::any::type_name::<U>())))
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(PhantomData)
    }
}
