//! Adapters from where people keep them, as vLLM, SGLang and LoRAX users load them: an
//! `http(s)://` URL of a folder (a Hub repository's `resolve/main`, any file server), an
//! `s3://bucket/prefix` (credentials, region and endpoint from the gateway's `AWS_*`
//! environment, as the AWS tools read them), or a folder on the gateway's machine
//! (`file:///...` or an absolute path). The files are read through `object_store` into
//! `blobs/incoming/`, bounded like an upload, then checked and recorded as one
//! ([`Gateway::put_adapter`](super::Gateway::put_adapter)).
//!
//! Reading the server's disk or its S3 credentials is the operator's: a tenant's key may load
//! from `http(s)://` only, and not from an address of the gateway's own networks (loopback,
//! private, link-local), so that no tenant reaches what only the cluster should.

use std::net::IpAddr;
use std::path::Path;

use futures_util::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;
use tandem_proto::contract::check_uri;

use super::Caller;
use super::openai::ApiError;
use super::staged::Staged;

/// The files an adapter folder may hold: PEFT LoRA's and ESFT's.
pub const ADAPTER_FILES: [&str; 4] =
    ["adapter_config.json", "adapter_model.safetensors", "esft_config.json", "esft_model.safetensors"];

/// The adapter files at `source`, staged under `blobs`, at most `max_bytes` in all; `param`
/// names the request's field in errors.
pub async fn fetch(
    source: &str,
    caller: &Caller,
    blobs: &Path,
    max_bytes: u64,
    param: &str,
) -> Result<Vec<(String, Staged)>, ApiError> {
    let (store, prefix) = open(source, caller, param).await?;
    let unreadable = |e: object_store::Error| ApiError::bad_request(param, format!("{source}: {e}"));
    let mut files = Vec::new();
    let mut total = 0u64;
    for name in ADAPTER_FILES {
        let found = match store.get(&prefix.child(name)).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(unreadable(e)),
        };
        let mut staged = Staged::create(blobs).await?;
        let mut bytes = found.into_stream();
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk.map_err(unreadable)?;
            total += chunk.len() as u64;
            if total > max_bytes {
                let msg = format!("{source}: the adapter is larger than {max_bytes} bytes");
                return Err(ApiError::new(axum::http::StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", msg));
            }
            staged.write(&chunk).await?;
        }
        files.push((name.to_string(), staged));
    }
    if files.is_empty() {
        let msg = format!("{source}: no adapter there (none of {})", ADAPTER_FILES.join(", "));
        return Err(ApiError::bad_request(param, msg));
    }
    Ok(files)
}

/// The store `source` names, and the folder in it.
async fn open(source: &str, caller: &Caller, param: &str) -> Result<(Box<dyn ObjectStore>, StorePath), ApiError> {
    let bad = |msg: String| ApiError::bad_request(param, msg);
    let url = |s: &str| url::Url::parse(s).map_err(|e| bad(format!("{s}: {e}")));
    let scheme = source.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some("http" | "https") => {
            // The URL is the folder (a trailing `/` would add an empty segment before the file).
            let url = url(source.trim_end_matches('/'))?;
            if !caller.admin {
                reachable_by_tenants(&url, param).await?;
            }
            let store = object_store::http::HttpBuilder::new()
                .with_url(url.as_str())
                .with_client_options(object_store::ClientOptions::new().with_allow_http(url.scheme() == "http"))
                .build()
                .map_err(|e| bad(e.to_string()))?;
            Ok((Box::new(store), StorePath::default()))
        }
        Some("s3") => {
            caller.must_be_operator("loading an adapter with the gateway's S3 credentials")?;
            let url = url(source)?;
            let bucket = url.host_str().ok_or_else(|| bad(format!("{source}: no bucket")))?;
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| bad(format!("{source}: {e}")))?;
            Ok((Box::new(store), StorePath::from(url.path().trim_matches('/'))))
        }
        Some("file") | None => {
            caller.must_be_operator("loading an adapter from the gateway's disk")?;
            let folder = source.strip_prefix("file://").unwrap_or(source);
            check_uri(param, folder).map_err(|e| bad(e.0))?;
            if !Path::new(folder).is_absolute() {
                return Err(bad(format!("{source}: give an absolute folder, an http(s):// or an s3:// URL")));
            }
            let store = object_store::local::LocalFileSystem::new_with_prefix(folder)
                .map_err(|e| bad(format!("{source}: {e}")))?;
            Ok((Box::new(store), StorePath::default()))
        }
        Some(other) => Err(bad(format!("{other}://: give an http(s):// or s3:// URL (or, as the operator, a folder)"))),
    }
}

/// Refuses a URL whose host is, or resolves to, an address of the gateway's own networks.
async fn reachable_by_tenants(url: &url::Url, param: &str) -> Result<(), ApiError> {
    let host = url.host_str().ok_or_else(|| ApiError::bad_request(param, format!("{url}: no host")))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| ApiError::bad_request(param, format!("{host}: {e}")))?;
    for addr in addrs {
        if internal(addr.ip()) {
            let msg = format!("{host} is an address of the cluster's own networks: only the operator loads from there");
            return Err(ApiError::new(axum::http::StatusCode::FORBIDDEN, "permission_denied", msg));
        }
    }
    Ok(())
}

/// Loopback, private, link-local (cloud metadata), unspecified or shared addresses.
fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                // 100.64.0.0/10, carrier-grade NAT.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => internal(IpAddr::V4(v4)),
            None => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || (v6.segments()[0] & 0xfe00) == 0xfc00
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::internal;

    #[test]
    fn the_clusters_own_networks_are_internal_and_the_internet_is_not() {
        let is = |a: &str| internal(a.parse().unwrap());
        for a in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1"] {
            assert!(is(a), "{a}");
        }
        for a in ["::1", "::", "fd00::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1"] {
            assert!(is(a), "{a}");
        }
        for a in ["8.8.8.8", "100.128.0.1", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(!is(a), "{a}");
        }
    }
}
