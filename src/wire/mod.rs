//! What crosses the wire, shared by the server and the client: the generated gRPC types
//! ([`proto`]) ATOMIC mode's chunk cipher ([`cipher`]) and
//! the receipts' signed encoding ([`receipt`]). Neither side reaches into the
//! other's modules for these.

pub mod cipher;
pub mod receipt;

#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("satstream.v1");

    /// Encoded descriptors for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("satstream_descriptor");
}
