//! Payload rules: body size, image format and pixels, single file, and the
//! request attributes that live in the body (JSON field, multipart file name).
//!
//! Bodies are read only when an operation needs them (payload rules or a body
//! attribute), into memory, never beyond the operation's `max_body` (or the
//! server's inspection cap): a larger declared `Content-Length` is refused
//! before a byte is read, a chunked body as soon as it crosses the cap. The
//! upstream sees nothing of a refused body. Formats are sniffed from the
//! bytes, never the file name; pixels are read from the image header only.

use axum::http::StatusCode;
use bytes::Bytes;
use tollgate_core::policy::{ImageFormat, PayloadRules};

use crate::error::ApiError;

/// What was found in a body.
#[derive(Debug, Default)]
pub struct Inspection {
    /// File name of the first file part of a multipart body.
    pub file_name: Option<String>,
    /// Number of file parts (or 1 for an `image/*` body).
    pub files: usize,
    /// The image: the first file part, or the whole `image/*` body.
    pub image: Option<Bytes>,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<serde_json::Value>,
}

impl Inspection {
    /// A top-level string field of a JSON body.
    pub fn json_field(&self, field: &str) -> Option<&str> {
        self.json.as_ref()?.get(field)?.as_str()
    }
}

/// Reads what the body holds, by content type.
///
/// # Errors
/// 400 for a malformed multipart or JSON body.
pub async fn inspect(content_type: Option<&str>, body: Bytes) -> Result<Inspection, ApiError> {
    let ct = content_type.unwrap_or("").to_ascii_lowercase();
    let mut out = Inspection::default();
    if ct.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(content_type.unwrap_or(""))
            .map_err(|_| ApiError::bad_request("multipart body without a valid boundary"))?;
        let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
        let mut mp = multer::Multipart::new(stream, boundary);
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(ApiError::bad_request(format!(
                        "malformed multipart body: {e}"
                    )));
                }
            };
            let Some(name) = field.file_name().map(str::to_owned) else {
                continue;
            };
            out.files += 1;
            if out.files == 1 {
                out.file_name = Some(name);
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
                out.image = Some(bytes);
            }
        }
    } else if ct.starts_with("image/") {
        out.files = 1;
        out.image = Some(body);
    } else if (ct.starts_with("application/json") || ct.ends_with("+json")) && !body.is_empty() {
        let v = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
        out.json = Some(v);
    }
    Ok(out)
}

/// The format of an image, from its first bytes.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    match imagesize::image_type(bytes).ok()? {
        imagesize::ImageType::Png => Some(ImageFormat::Png),
        imagesize::ImageType::Jpeg => Some(ImageFormat::Jpeg),
        imagesize::ImageType::Webp => Some(ImageFormat::Webp),
        imagesize::ImageType::Heif(c) if !matches!(c, imagesize::Compression::Av1) => {
            Some(ImageFormat::Heic)
        }
        _ => None,
    }
}

/// What the payload rules decided about an inspected body.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward.
    Pass,
    /// Forward; the image is over `max_pixels` and the upstream resizes it.
    PassOversize,
}

/// Applies the payload rules to an inspection.
///
/// # Errors
/// 400 for several files, 415 for a format not accepted (or no image where
/// formats are required), 422 for an image over `max_pixels` when not forwarded.
pub fn check(rules: &PayloadRules, ins: &Inspection) -> Result<Verdict, ApiError> {
    if rules.single_file && ins.files > 1 {
        return Err(ApiError::bad_request(format!(
            "{} files in one request; this operation takes a single file",
            ins.files
        )));
    }
    let needs_image = !rules.formats.is_empty() || rules.max_pixels.is_some();
    if !needs_image {
        return Ok(Verdict::Pass);
    }
    let Some(image) = &ins.image else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "no image found: send a multipart/form-data file part or an image/* body",
        ));
    };
    let format = sniff(image);
    if !rules.formats.is_empty() && !format.is_some_and(|f| rules.formats.contains(&f)) {
        let accepted: Vec<&str> = rules.formats.iter().map(|f| format_name(*f)).collect();
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "image format {} is not accepted here; send one of: {}",
                format.map_or("unknown", format_name),
                accepted.join(", ")
            ),
        ));
    }
    if let Some(max) = rules.max_pixels {
        let size = imagesize::blob_size(image).map_err(|_| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unreadable_image",
                "the image header cannot be read",
            )
        })?;
        let widest = size.width.max(size.height);
        if widest > max as usize {
            if rules.forward_oversize {
                return Ok(Verdict::PassOversize);
            }
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "image_too_large",
                format!(
                    "image is {}×{} pixels; the widest side may be at most {max}",
                    size.width, size.height
                ),
            )
            .with("max_pixels", max));
        }
    }
    Ok(Verdict::Pass)
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Webp => "webp",
        ImageFormat::Heic => "heic",
    }
}

/// 413 for a body over `max` bytes.
pub fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body is larger than {max} bytes"),
    )
    .with("max_bytes", max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG header declaring `w`×`h` pixels (enough bytes for the sniffer).
    pub fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = vec![
            0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R',
        ];
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    fn rules(max_pixels: Option<u32>, forward: bool) -> PayloadRules {
        PayloadRules {
            max_body: None,
            formats: vec![ImageFormat::Png, ImageFormat::Jpeg],
            max_pixels,
            forward_oversize: forward,
            single_file: true,
        }
    }

    #[tokio::test]
    async fn multipart_first_file_is_inspected() {
        let img = png(6001, 10);
        let mut body = b"--b\r\nContent-Disposition: form-data; name=\"image_file\"; filename=\"cat.png\"\r\nContent-Type: image/png\r\n\r\n".to_vec();
        body.extend_from_slice(&img);
        body.extend_from_slice(b"\r\n--b--\r\n");
        let ins = inspect(Some("multipart/form-data; boundary=b"), Bytes::from(body))
            .await
            .unwrap();
        assert_eq!(ins.file_name.as_deref(), Some("cat.png"));
        assert_eq!(ins.files, 1);
        assert_eq!(sniff(ins.image.as_ref().unwrap()), Some(ImageFormat::Png));
        assert_eq!(
            check(&rules(Some(6000), false), &ins).unwrap_err().status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            check(&rules(Some(6000), true), &ins).unwrap(),
            Verdict::PassOversize
        );
        assert_eq!(
            check(&rules(Some(6001), false), &ins).unwrap(),
            Verdict::Pass
        );
    }

    #[tokio::test]
    async fn format_is_sniffed_not_named() {
        let ins = inspect(
            Some("image/png"),
            Bytes::from_static(b"GIF89a\x01\x00\x01\x00"),
        )
        .await
        .unwrap();
        assert_eq!(
            check(&rules(None, false), &ins).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[tokio::test]
    async fn json_fields_and_bad_json() {
        let ins = inspect(
            Some("application/json"),
            Bytes::from_static(br#"{"image_name":"a.jpg"}"#),
        )
        .await
        .unwrap();
        assert_eq!(ins.json_field("image_name"), Some("a.jpg"));
        assert!(
            inspect(Some("application/json"), Bytes::from_static(b"{nope"))
                .await
                .is_err()
        );
    }
}
