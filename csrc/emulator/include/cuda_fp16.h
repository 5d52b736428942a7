// The CPU emulator in place of the CUDA toolkit header of this name (see ../cuda_emulator.h).
#pragma once
#include "../cuda_emulator.h"
