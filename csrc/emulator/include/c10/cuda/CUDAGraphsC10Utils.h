// The CPU emulator in place of c10's CUDA graph utilities: nothing is ever being captured.
#pragma once

namespace c10 {
namespace cuda {
enum class CaptureStatus : int { None = 0, Active = 1, Invalidated = 2 };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }
}  // namespace cuda
}  // namespace c10
