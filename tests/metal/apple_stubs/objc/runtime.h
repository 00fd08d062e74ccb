// Stand-in for the Apple SDK header (compile check only; see README.md).
#pragma once
#include <cstddef>
struct objc_object {
  void* isa;
};
typedef struct objc_class* Class;
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef struct objc_object Protocol;
typedef signed char BOOL;
typedef id (*IMP)(id, SEL, ...);
extern "C" {
SEL sel_registerName(const char* name);
id objc_lookUpClass(const char* name);
Protocol* objc_getProtocol(const char* name);
id objc_getClass(const char* name);
void objc_msgSend(void);
void objc_msgSend_fpret(void);
void objc_msgSend_stret(void);
}
