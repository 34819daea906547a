//! TODO: the DFU 1.1 download over `usb::UsbTransport`.
