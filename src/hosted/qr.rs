//! Payment QR codes as inline SVG, rendered on the server with the `qrcode` crate.

use qrcode::render::svg;
use qrcode::{EcLevel, QrCode};

/// An `<svg>` element showing `text` as a QR code (medium error correction, with its quiet zone).
pub fn svg(text: &str) -> Option<String> {
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M).ok()?;
    let image = code
        .render::<svg::Color<'_>>()
        .min_dimensions(232, 232)
        .dark_color(svg::Color("#000000"))
        .light_color(svg::Color("#ffffff"))
        .quiet_zone(true)
        .build();
    // Inline in HTML: no XML declaration, and a name for screen readers.
    let start = image.find("<svg")?;
    Some(image[start..].replacen("<svg", "<svg role=\"img\" aria-label=\"QR code\"", 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_svg_is_one_inline_element_without_styles_or_scripts() {
        let image = svg("ZASTRPAY:V1/T:TI/ID:0191C3A4-5B6D-7E8F-9A0B-1C2D3E4F5A6B/DIR:D").unwrap();
        assert!(image.starts_with("<svg role=\"img\""), "{}", &image[..60]);
        assert!(image.trim_end().ends_with("</svg>"));
        for forbidden in ["<?xml", "style=", "<script", "<style"] {
            assert!(!image.contains(forbidden), "{forbidden}");
        }
    }
}
