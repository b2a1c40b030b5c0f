//! Image decoding (png, jpeg) with the `image` crate, to 8-bit gray or RGB.

use super::{Image, ImageKind};

/// Widest or tallest image decoded, in pixels: training images are at most a few thousand pixels a side.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Most memory one image decode may allocate (the `image` crate checks it before allocating).
pub const MAX_IMAGE_ALLOC: u64 = 256 << 20;

/// Decodes png or jpeg bytes, refusing images larger than [`MAX_IMAGE_SIDE`] a side or [`MAX_IMAGE_ALLOC`] bytes. Gray images (with or without alpha, 8 or 16 bit) become 1 channel, everything else
/// 3-channel RGB; alpha is dropped, as torchvision's `convert("RGB")` does.
pub fn image(bytes: &[u8], kind: ImageKind) -> Result<Image, String> {
    // Trust the bytes over the extension: a `.jpg` that is really a png still decodes.
    let format = image::guess_format(bytes).unwrap_or(match kind {
        ImageKind::Png => image::ImageFormat::Png,
        ImageKind::Jpeg => image::ImageFormat::Jpeg,
    });
    // A few hundred bytes of png can declare a 65535 x 65535 image: the header is checked against the limits
    // before any pixel buffer is allocated.
    let (width, height) = image::ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| e.to_string())?;
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(format!(
            "image is {width} x {height} pixels, larger than the limit of {MAX_IMAGE_SIDE} pixels a side"
        ));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| e.to_string())?;
    let gray = matches!(
        img.color(),
        image::ColorType::L8 | image::ColorType::La8 | image::ColorType::L16 | image::ColorType::La16
    );
    Ok(if gray {
        let g = img.into_luma8();
        Image { height: g.height() as usize, width: g.width() as usize, channels: 1, pixels: g.into_raw() }
    } else {
        let c = img.into_rgb8();
        Image { height: c.height() as usize, width: c.width() as usize, channels: 3, pixels: c.into_raw() }
    })
}

/// Encodes an image as png (what `pack` writes for CIFAR and MNIST).
pub fn png(img: &Image) -> Result<Vec<u8>, String> {
    use image::ImageEncoder;
    let color = match img.channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        c => return Err(format!("cannot write a {c}-channel image as png")),
    };
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&img.pixels, img.width as u32, img.height as u32, color)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_roundtrip_keeps_pixels_for_rgb_and_gray() {
        for channels in [1, 3] {
            let pixels: Vec<u8> = (0..5 * 7 * channels).map(|i| (i * 37 % 256) as u8).collect();
            let img = Image { height: 5, width: 7, channels, pixels };
            let back = image(&png(&img).unwrap(), ImageKind::Png).unwrap();
            assert_eq!(back, img);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(image(b"definitely not an image", ImageKind::Png).is_err());
        assert!(image(b"\x89PNG\r\n\x1a\n\0\0\0", ImageKind::Png).is_err());
    }

    #[test]
    fn an_image_declaring_more_pixels_than_the_limit_is_refused_before_decoding() {
        // A valid png header (IHDR) claiming 20000 x 20000 gray pixels, then a few bytes of (empty) pixel data.
        let side = MAX_IMAGE_SIDE + 3616;
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        for (len, chunk) in [(13u32, ihdr), (2, b"IDAT\x78\x9c".to_vec()), (0, b"IEND".to_vec())] {
            png.extend_from_slice(&len.to_be_bytes());
            png.extend_from_slice(&chunk);
            png.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        let e = image(&png, ImageKind::Png).unwrap_err();
        assert_eq!(
            e,
            format!("image is {side} x {side} pixels, larger than the limit of {MAX_IMAGE_SIDE} pixels a side")
        );
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
